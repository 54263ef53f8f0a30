//! The guest `config` interface: the config values and secrets granted to
//! the node being run, and nothing else.

use std::sync::Arc;

use wasmtime::component::{HasSelf, Linker};

use super::NodeGrants;
use crate::runtime::StoreState;
use crate::world::config;

/// Config's slice of store state: what this execution's node is granted.
#[derive(Debug)]
pub struct ConfigState {
    grants: Arc<NodeGrants>,
}

impl ConfigState {
    pub(crate) fn new(grants: Arc<NodeGrants>) -> Self {
        Self { grants }
    }
}

pub(crate) fn add_to_linker(linker: &mut Linker<StoreState>) -> wasmtime::Result<()> {
    config::add_to_linker::<StoreState, HasSelf<ConfigState>>(linker, |s| &mut s.config)
}

impl config::Host for ConfigState {
    fn get(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        Ok(self.grants.config.get(&key).cloned())
    }

    fn get_secret(&mut self, name: String) -> wasmtime::Result<Option<String>> {
        Ok(self
            .grants
            .secrets
            .get(&name)
            .map(|s| s.expose().to_owned()))
    }
}
