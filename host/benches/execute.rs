//! Per-call cost of one in-process execution of the built-in echo:
//! admission, a fresh instance, the guest call and both schema checks.

use std::sync::atomic::{AtomicU64, Ordering};

use arp_types::{AtomicExecuteRequest, NodeRunState};
use criterion::{Criterion, criterion_group, criterion_main};
use jarvis_atomic_executor::Service;
use jarvis_atomic_executor::config::Config;

// As the binary: the allocator is part of the per-call cost.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn request(n: u64) -> AtomicExecuteRequest {
    serde_json::from_value(serde_json::json!({
        "node_run_id": format!("bench-{n}"),
        "run_id": "bench",
        "node_type_ref": { "node_type_id": "jarvis.core.echo", "version": "0.3.8" },
        "inputs": { "echo": "hi" },
    }))
    .expect("valid request")
}

fn echo(c: &mut Criterion) {
    // A request handler runs its execution in its own task; a current-thread
    // runtime measures that path without criterion's thread handing every
    // iteration to another thread and back.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let service = runtime
        .block_on(Service::start(&Config::for_tests()))
        .expect("service");
    let executor = service.executor.clone();
    let counter = AtomicU64::new(0);
    c.bench_function("execute echo (in-process)", |b| {
        b.to_async(&runtime).iter(|| {
            let request = request(counter.fetch_add(1, Ordering::Relaxed));
            let executor = executor.clone();
            async move {
                let done = executor.execute(request, "bench").await.expect("executed");
                assert_eq!(done.state, NodeRunState::Succeeded);
            }
        })
    });
}

criterion_group!(benches, echo);
criterion_main!(benches);
