//! Writes a node pack whose node `bench.spin` loops forever, for
//! `scripts/bench-spin.sh`: `spin_pack OUT.wasm`.

use jarvis_atomic_executor::wasmtime_wat;
use jarvis_atomic_executor::watpack::{WatNode, WatPack};

fn main() -> anyhow::Result<()> {
    let out = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: spin_pack OUT.wasm"))?;
    let wat = WatPack::new("bench.spin", "1.0.0")
        .node(WatNode::new("bench.spin", "1.0.0"))
        .to_wat("(loop $spin (br $spin)) (unreachable)");
    std::fs::write(&out, wasmtime_wat(&wat)?)?;
    Ok(())
}
