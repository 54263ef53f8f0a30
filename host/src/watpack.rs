//! Writes node packs as WebAssembly text, with no guest toolchain.
//!
//! The built-in `jarvis.core.echo` is one of these, and tests use them for
//! hostile guests (spinning, trapping, memory-hungry). [`WatPack`] lays out
//! the pack's `describe` answer in linear memory following the component
//! model's canonical ABI, so the WAT author only writes the body of `invoke`.
//!
//! The body of `invoke` is core wasm for `(func $invoke (param $call i32) (result i32))`.
//! `$call` points at the `invocation` record; useful offsets are in [`call`].
//! Helpers in scope: `(call $ok_inputs (local.get $call))` returns `ok(inputs)`,
//! `(call $ok (ptr) (len))` returns `ok(string)`, `(call $err (code_ptr) (code_len)
//! (msg_ptr) (msg_len))` returns a node error; place strings with [`WatPack::data`].

use std::fmt::Write as _;

/// Byte offsets of `invocation` fields in linear memory (canonical ABI).
pub mod call {
    pub const NODE_TYPE_ID: u32 = 0;
    pub const VERSION: u32 = 8;
    pub const INPUTS_PTR: u32 = 16;
    pub const INPUTS_LEN: u32 = 20;
    pub const RUN_ID: u32 = 24;
    pub const NODE_RUN_ID: u32 = 32;
}

/// Byte offsets in the `pack-info` record `describe` returns, and in each
/// `node-spec` of its list (canonical ABI), for [`WatPack::with_describe`].
pub mod describe {
    pub const NODES_PTR: u32 = 16;
    pub const NODES_LEN: u32 = 20;
    /// Size of one `node-spec` record.
    pub const NODE_SIZE: u32 = 80;
    pub const NODE_TYPE_ID: u32 = 0;
    pub const DESCRIPTION: u32 = 16;
    pub const INPUT_SCHEMA: u32 = 24;
    pub const OUTPUT_SCHEMA: u32 = 32;
}

/// Where static data starts; below it, the result area of `invoke`.
const DATA_BASE: u32 = 1024;
const RESULT_AREA: u32 = 64;
/// Heap a [`WatPack::with_byte_pages`] memory starts with, before rounding.
const SMALL_HEAP: u32 = 1024;
/// Granule of a byte-page memory's size: the smallest host page in use.
const HOST_PAGE: u32 = 4096;

/// One node of a [`WatPack`].
#[derive(Debug, Clone)]
pub struct WatNode {
    pub node_type_id: String,
    pub version: String,
    pub description: String,
    pub input_schema: String,
    pub output_schema: String,
    /// 0 read, 1 write, 2 irreversible.
    pub side_effect: u8,
    pub trust_tier: String,
    pub tags: Vec<String>,
    pub max_wall_time_ms: Option<u32>,
}

impl WatNode {
    /// A read-only node taking and returning any JSON object.
    pub fn new(node_type_id: &str, version: &str) -> Self {
        Self {
            node_type_id: node_type_id.into(),
            version: version.into(),
            description: format!("{node_type_id} (WAT test node)"),
            input_schema: r#"{"type":"object"}"#.into(),
            output_schema: r#"{"type":"object"}"#.into(),
            side_effect: 0,
            trust_tier: "first_party".into(),
            tags: Vec::new(),
            max_wall_time_ms: None,
        }
    }
}

/// One entry of a [`WatPack`]'s `needs` answer: the `node-needs` record of
/// `jarvis:node/needs`.
#[derive(Debug, Clone, Default)]
pub struct WatNeeds {
    pub node_type_id: String,
    pub hosts: Vec<String>,
    pub config: Vec<String>,
    pub secrets: Vec<String>,
}

impl WatNeeds {
    /// An entry for `node_type_id` (or `*`) needing nothing yet.
    pub fn new(node_type_id: &str) -> Self {
        Self {
            node_type_id: node_type_id.into(),
            ..Self::default()
        }
    }

    pub fn host(mut self, pattern: &str) -> Self {
        self.hosts.push(pattern.into());
        self
    }

    pub fn config(mut self, key: &str) -> Self {
        self.config.push(key.into());
        self
    }

    pub fn secret(mut self, name: &str) -> Self {
        self.secrets.push(name.into());
        self
    }
}

/// A single-module component implementing the `node-pack` world (or
/// `node-pack-with-needs`, see [`WatPack::with_needs`]).
#[derive(Debug, Clone)]
pub struct WatPack {
    pack_id: String,
    pack_version: String,
    nodes: Vec<WatNode>,
    image: Vec<u8>,
    sleep_import: bool,
    byte_pages: bool,
    log_import: bool,
    config_import: bool,
    describe_prologue: String,
    describe_post_return: String,
    needs: Option<Vec<WatNeeds>>,
}

impl WatPack {
    pub fn new(pack_id: &str, pack_version: &str) -> Self {
        Self {
            pack_id: pack_id.into(),
            pack_version: pack_version.into(),
            nodes: Vec::new(),
            image: Vec::new(),
            sleep_import: false,
            byte_pages: false,
            log_import: false,
            config_import: false,
            describe_prologue: String::new(),
            describe_post_return: String::new(),
            needs: None,
        }
    }

    /// Runs `body` in `describe` before it returns: the `pack-info` laid out
    /// from the declared nodes is at `(local.get $info)` (offsets in
    /// [`describe`]), and locals `$i`, `$p` (i32) are free, so a hostile
    /// pack can rewrite its answer at run time (thousands of nodes, huge
    /// strings) without a huge data segment.
    pub fn with_describe(mut self, body: &str) -> Self {
        self.describe_prologue = body.into();
        self
    }

    /// Declares the linear memory with 1-byte pages (the custom-page-sizes
    /// proposal), sized to the static data plus a small heap, rounded up to
    /// 4 KiB (one host page on x86-64); `cabi_realloc` grows it 4 KiB at a
    /// time. An execution that stays within one host page costs the pooling
    /// allocator a memset of that page to reset, where a 64 KiB memory costs
    /// a scan of the slot's page tables (Linux `PAGEMAP_SCAN`) or a 64 KiB
    /// memset.
    /// Invoke bodies must then size memory in bytes, not 64 KiB pages.
    pub fn with_byte_pages(mut self) -> Self {
        self.byte_pages = true;
        self
    }

    /// Imports `jarvis:node/timer.sleep`, callable in `invoke` as
    /// `(call $sleep (i64.const MILLISECONDS))`.
    pub fn with_sleep(mut self) -> Self {
        self.sleep_import = true;
        self
    }

    /// Runs `body` in `describe`'s post-return, after the host has taken
    /// the answer: a guest may free or reuse that memory then.
    pub fn with_describe_post_return(mut self, body: &str) -> Self {
        self.describe_post_return = body.into();
        self
    }

    /// Imports `jarvis:node/log.log`, callable in `invoke` as `(call $log
    /// (level) (msg_ptr) (msg_len) (fields_ptr) (fields_count))`, where
    /// level is 0 trace .. 4 error and each field is four i32s (key ptr,
    /// key len, value ptr, value len). The memory then lives in a core
    /// module of its own, which the lowered import needs before the main
    /// module exists.
    pub fn with_log(mut self) -> Self {
        self.log_import = true;
        self
    }

    /// Imports `jarvis:node/config`, callable in `invoke` as `(call
    /// $config_get (key_ptr) (key_len) (ret))` and `(call $config_secret
    /// (name_ptr) (name_len) (ret))`, each writing an `option<string>` at
    /// `ret` (tag byte at +0, pointer at +4, length at +8). Like
    /// [`WatPack::with_log`], the memory lives in a module of its own, whose
    /// bump allocator places the host's strings in the memory's top 16 KiB.
    pub fn with_config(mut self) -> Self {
        self.config_import = true;
        self
    }

    /// Exports `jarvis:node/needs` (the `node-pack-with-needs` world),
    /// whose `needs` answers `needs` as given, valid or not.
    pub fn with_needs(mut self, needs: Vec<WatNeeds>) -> Self {
        self.needs = Some(needs);
        self
    }

    pub fn node(mut self, node: WatNode) -> Self {
        self.nodes.push(node);
        self
    }

    /// Places `bytes` in the static data; returns `(address, length)`.
    pub fn data(&mut self, bytes: &[u8]) -> (u32, u32) {
        (self.put(bytes, 1), bytes.len() as u32)
    }

    fn put(&mut self, bytes: &[u8], align: usize) -> u32 {
        while !self.image.len().is_multiple_of(align) {
            self.image.push(0);
        }
        let addr = DATA_BASE + self.image.len() as u32;
        self.image.extend_from_slice(bytes);
        addr
    }

    fn put_str(&mut self, s: &str) -> [u8; 8] {
        let (ptr, len) = self.data(s.as_bytes());
        pair(ptr, len)
    }

    /// Lays out `pack-info` and returns its address.
    fn layout_describe(&mut self) -> u32 {
        let nodes = self.nodes.clone();
        let mut specs = Vec::with_capacity(nodes.len() * 80);
        for n in &nodes {
            let mut rec = [0u8; 80];
            rec[0..8].copy_from_slice(&self.put_str(&n.node_type_id));
            rec[8..16].copy_from_slice(&self.put_str(&n.version));
            rec[16..24].copy_from_slice(&self.put_str(&n.description));
            rec[24..32].copy_from_slice(&self.put_str(&n.input_schema));
            rec[32..40].copy_from_slice(&self.put_str(&n.output_schema));
            rec[40] = n.side_effect;
            rec[44..52].copy_from_slice(&self.put_str(&n.trust_tier));
            // egress-policy: none (52..64 stay zero).
            let tags: Vec<[u8; 8]> = n.tags.iter().map(|t| self.put_str(t)).collect();
            let tags_addr = self.put(&tags.concat(), 4);
            rec[64..72].copy_from_slice(&pair(tags_addr, tags.len() as u32));
            if let Some(ms) = n.max_wall_time_ms {
                rec[72] = 1;
                rec[76..80].copy_from_slice(&ms.to_le_bytes());
            }
            specs.extend_from_slice(&rec);
        }
        let specs_addr = self.put(&specs, 4);
        let mut info = [0u8; 24];
        let (id, version) = (self.pack_id.clone(), self.pack_version.clone());
        info[0..8].copy_from_slice(&self.put_str(&id));
        info[8..16].copy_from_slice(&self.put_str(&version));
        info[16..24].copy_from_slice(&pair(specs_addr, nodes.len() as u32));
        self.put(&info, 4)
    }

    /// Lays out the `list<node-needs>` `needs` returns and returns the
    /// address of its (pointer, length) pair.
    fn layout_needs(&mut self, needs: &[WatNeeds]) -> u32 {
        let mut records = Vec::with_capacity(needs.len() * 32);
        for entry in needs {
            let mut rec = [0u8; 32];
            rec[0..8].copy_from_slice(&self.put_str(&entry.node_type_id));
            for (at, list) in [(8, &entry.hosts), (16, &entry.config), (24, &entry.secrets)] {
                let items: Vec<[u8; 8]> = list.iter().map(|s| self.put_str(s)).collect();
                let addr = self.put(&items.concat(), 4);
                rec[at..at + 8].copy_from_slice(&pair(addr, items.len() as u32));
            }
            records.extend_from_slice(&rec);
        }
        let addr = self.put(&records, 4);
        self.put(&pair(addr, needs.len() as u32), 4)
    }

    /// The component's WAT, with `invoke_body` as the body of `$invoke`.
    pub fn to_wat(&self, invoke_body: &str) -> String {
        let mut pack = self.clone();
        let describe_addr = pack.layout_describe();
        let needs_addr = self.needs.as_deref().map(|needs| pack.layout_needs(needs));
        let (needs_core, needs_component) = match needs_addr {
            None => (String::new(), String::new()),
            Some(addr) => (
                format!(r#"(func (export "needs") (result i32) (i32.const {addr}))"#),
                r#"(type $node-needs' (record (field "node-type-id" string) (field "hosts" (list string))
    (field "config" (list string)) (field "secrets" (list string))))
  (func $needs_f (result (list $node-needs'))
    (canon lift (core func $i "needs") (memory (core memory $i "memory")) (realloc (core func $i "cabi_realloc"))))
  (instance $needs_i (export "node-needs" (type $node-needs')) (export "needs" (func $needs_f)))
  (export "jarvis:node/needs@0.1.0" (instance $needs_i))"#
                    .to_owned(),
            ),
        };
        let heap_start = (DATA_BASE + pack.image.len() as u32).next_multiple_of(8);
        // `memory.size` and `memory.grow` count pages; the heap grows in steps
        // of `step` bytes (a multiple of the page size).
        let (memory, page_shift, step) = if self.byte_pages {
            let min = (heap_start + SMALL_HEAP).next_multiple_of(HOST_PAGE);
            (format!("{min} (pagesize 1)"), 0, HOST_PAGE)
        } else {
            ("1".to_owned(), 16, 1 << 16)
        };
        let mut escaped = String::with_capacity(pack.image.len() * 3);
        for b in &pack.image {
            let _ = write!(escaped, "\\{b:02x}");
        }
        let mut component_imports = String::new();
        let mut module_imports = String::new();
        let mut host_exports = String::new();
        if self.sleep_import {
            component_imports.push_str(
                r#"(import "jarvis:node/timer@0.1.0" (instance $timer (export "sleep" (func (param "duration-ms" u64)))))
  (alias export $timer "sleep" (func $sleep_f))
  (core func $sleep_lowered (canon lower (func $sleep_f)))"#,
            );
            module_imports.push_str(r#"(import "host" "sleep" (func $sleep (param i64)))"#);
            host_exports.push_str(r#" (export "sleep" (func $sleep_lowered))"#);
        }
        let shared_memory = self.log_import || self.config_import;
        if shared_memory {
            // Strings the host hands over go to the top 16 KiB of the first
            // 64 KiB, above the static data and the heap of small packs.
            let _ = write!(
                component_imports,
                r#"
  (core module $memory_m
    (memory (export "memory") {memory})
    (global $bump (mut i32) (i32.const 49152))
    (func (export "realloc") (param i32 i32) (param $align i32) (param $size i32) (result i32)
      (local $ptr i32)
      (local.set $ptr (i32.and (i32.add (global.get $bump) (i32.sub (local.get $align) (i32.const 1)))
                               (i32.sub (i32.const 0) (local.get $align))))
      (global.set $bump (i32.add (local.get $ptr) (local.get $size)))
      (if (i32.gt_u (global.get $bump) (i32.const 65536)) (then unreachable))
      (local.get $ptr)))
  (core instance $memory_i (instantiate $memory_m))
  (alias core export $memory_i "memory" (core memory $shared_memory))
  (alias core export $memory_i "realloc" (core func $shared_realloc))"#
            );
            host_exports.push_str(r#" (export "memory" (memory $shared_memory))"#);
        }
        if self.log_import {
            component_imports.push_str(
                r#"
  (import "jarvis:node/log@0.1.0" (instance $log
    (type $level' (enum "trace" "debug" "info" "warn" "error"))
    (export "level" (type $level (eq $level')))
    (type $field' (record (field "key" string) (field "value" string)))
    (export "field" (type $field (eq $field')))
    (export "log" (func (param "level" $level) (param "message" string) (param "fields" (list $field))))))
  (alias export $log "log" (func $log_f))
  (core func $log_lowered (canon lower (func $log_f) (memory $shared_memory)))"#,
            );
            module_imports
                .push_str(r#"(import "host" "log" (func $log (param i32 i32 i32 i32 i32)))"#);
            host_exports.push_str(r#" (export "log" (func $log_lowered))"#);
        }
        if self.config_import {
            component_imports.push_str(
                r#"
  (import "jarvis:node/config@0.1.0" (instance $config
    (export "get" (func (param "key" string) (result (option string))))
    (export "get-secret" (func (param "name" string) (result (option string))))))
  (alias export $config "get" (func $config_get_f))
  (alias export $config "get-secret" (func $config_secret_f))
  (core func $config_get_lowered (canon lower (func $config_get_f) (memory $shared_memory) (realloc $shared_realloc)))
  (core func $config_secret_lowered (canon lower (func $config_secret_f) (memory $shared_memory) (realloc $shared_realloc)))"#,
            );
            module_imports.push_str(
                r#"(import "host" "config_get" (func $config_get (param i32 i32 i32)))
    (import "host" "config_secret" (func $config_secret (param i32 i32 i32)))"#,
            );
            host_exports.push_str(
                r#" (export "config_get" (func $config_get_lowered)) (export "config_secret" (func $config_secret_lowered))"#,
            );
        }
        let memory_decl = if shared_memory {
            format!(r#"(memory (export "memory") (import "host" "memory") {memory})"#)
        } else {
            format!(r#"(memory (export "memory") {memory})"#)
        };
        let instantiate = if host_exports.is_empty() {
            r#"(core instance $i (instantiate $m))"#.to_owned()
        } else {
            format!(
                r#"(core instance $host{host_exports})
  (core instance $i (instantiate $m (with "host" (instance $host))))"#
            )
        };
        format!(
            r#"(component
  {component_imports}
  (core module $m
    {module_imports}
    {memory_decl}
    (data (i32.const {DATA_BASE}) "{escaped}")
    (global $heap (mut i32) (i32.const {heap_start}))
    (func $realloc (export "cabi_realloc") (param $old i32) (param $old_size i32) (param $align i32) (param $size i32) (result i32)
      (local $ptr i32) (local $end i32) (local $have i32)
      (local.set $ptr (i32.and (i32.add (global.get $heap) (i32.sub (local.get $align) (i32.const 1)))
                               (i32.sub (i32.const 0) (local.get $align))))
      (local.set $end (i32.add (local.get $ptr) (local.get $size)))
      (if (i32.lt_u (local.get $end) (local.get $ptr)) (then unreachable))
      (local.set $have (i32.shl (memory.size) (i32.const {page_shift})))
      (if (i32.gt_u (local.get $end) (local.get $have))
        (then
          (if (i32.eq (memory.grow (i32.shr_u (i32.and (i32.add (i32.sub (local.get $end) (local.get $have)) (i32.const {step_mask}))
                                                       (i32.const {step_round}))
                                              (i32.const {page_shift})))
                      (i32.const -1))
            (then unreachable))))
      (global.set $heap (local.get $end))
      (if (local.get $old_size) (then (memory.copy (local.get $ptr) (local.get $old) (local.get $old_size))))
      (local.get $ptr))
    (func $ok (param $ptr i32) (param $len i32) (result i32)
      (i32.store8 (i32.const {RESULT_AREA}) (i32.const 0))
      (i32.store (i32.const {r4}) (local.get $ptr))
      (i32.store (i32.const {r8}) (local.get $len))
      (i32.const {RESULT_AREA}))
    (func $ok_inputs (param $call i32) (result i32)
      (call $ok (i32.load offset={inputs_ptr} (local.get $call)) (i32.load offset={inputs_len} (local.get $call))))
    (func $err (param $code i32) (param $code_len i32) (param $msg i32) (param $msg_len i32) (result i32)
      (i32.store8 (i32.const {RESULT_AREA}) (i32.const 1))
      (i32.store (i32.const {r4}) (local.get $code))
      (i32.store (i32.const {r8}) (local.get $code_len))
      (i32.store (i32.const {r12}) (local.get $msg))
      (i32.store (i32.const {r16}) (local.get $msg_len))
      (i32.store8 (i32.const {r20}) (i32.const 0))
      (i32.const {RESULT_AREA}))
    (func (export "describe") (result i32) (local $info i32) (local $i i32) (local $p i32)
      (local.set $info (i32.const {describe_addr}))
      {describe_prologue}
      (local.get $info))
    (func (export "cabi_post_describe") (param i32) {describe_post_return})
    (func (export "invoke") (param $call i32) (result i32)
      {invoke_body})
    (func (export "cabi_post_invoke") (param i32) (global.set $heap (i32.const {heap_start})))
    {needs_core}
  )
  {instantiate}
  (type $side-effect' (enum "read" "write" "irreversible"))
  (export $side-effect "side-effect" (type $side-effect'))
  (type $node-spec' (record
    (field "node-type-id" string) (field "version" string) (field "description" string)
    (field "input-schema" string) (field "output-schema" string) (field "side-effect" $side-effect)
    (field "trust-tier" string) (field "egress-policy" (option string)) (field "tags" (list string))
    (field "max-wall-time-ms" (option u32))))
  (export $node-spec "node-spec" (type $node-spec'))
  (type $pack-info' (record (field "pack-id" string) (field "pack-version" string) (field "nodes" (list $node-spec))))
  (export $pack-info "pack-info" (type $pack-info'))
  (type $invocation' (record
    (field "node-type-id" string) (field "version" string) (field "inputs" string)
    (field "run-id" string) (field "node-run-id" string)
    (field "trace-id" (option string)) (field "span-id" (option string)) (field "deadline-unix-ms" u64)))
  (export $invocation "invocation" (type $invocation'))
  (type $node-error' (record (field "code" string) (field "message" string) (field "details" (option string))))
  (export $node-error "node-error" (type $node-error'))
  (func (export "describe") (result $pack-info)
    (canon lift (core func $i "describe") (memory (core memory $i "memory")) (realloc (core func $i "cabi_realloc"))
      (post-return (core func $i "cabi_post_describe"))))
  (func (export "invoke") (param "call" $invocation) (result (result string (error $node-error)))
    (canon lift (core func $i "invoke") (memory (core memory $i "memory")) (realloc (core func $i "cabi_realloc"))
      (post-return (core func $i "cabi_post_invoke"))))
  {needs_component}
)"#,
            r4 = RESULT_AREA + 4,
            r8 = RESULT_AREA + 8,
            r12 = RESULT_AREA + 12,
            r16 = RESULT_AREA + 16,
            r20 = RESULT_AREA + 20,
            step_mask = step - 1,
            step_round = !(step - 1) as i32,
            inputs_ptr = call::INPUTS_PTR,
            inputs_len = call::INPUTS_LEN,
            describe_prologue = self.describe_prologue,
            describe_post_return = self.describe_post_return,
        )
    }
}

fn pair(ptr: u32, len: u32) -> [u8; 8] {
    let mut out = [0u8; 8];
    out[..4].copy_from_slice(&ptr.to_le_bytes());
    out[4..].copy_from_slice(&len.to_le_bytes());
    out
}

/// The built-in `jarvis.core.echo`, as the Python core pack defines it.
///
/// The host validates inputs against the input schema below before the call
/// (exactly one property, `echo`, a string), so returning the inputs object
/// unchanged *is* `{"echo": inputs.echo}`; the output schema is checked after.
pub fn builtin_echo_wat() -> String {
    const SCHEMA: &str = r#"{"type":"object","additionalProperties":false,"properties":{"echo":{"type":"string"}},"required":["echo"]}"#;
    let node = WatNode {
        node_type_id: "jarvis.core.echo".into(),
        version: BUILTIN_VERSION.into(),
        description: "Return the provided `echo` string (deterministic baseline node).".into(),
        input_schema: SCHEMA.into(),
        output_schema: SCHEMA.into(),
        side_effect: 0,
        trust_tier: "first_party".into(),
        tags: vec!["core".into()],
        max_wall_time_ms: None,
    };
    WatPack::new("jarvis.builtin", BUILTIN_VERSION)
        .node(node)
        .with_byte_pages()
        .to_wat("(call $ok_inputs (local.get $call))")
}

/// Version of the built-in echo: that of the Python core pack it stands for.
pub const BUILTIN_VERSION: &str = "0.3.8";
