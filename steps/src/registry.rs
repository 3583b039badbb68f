//! The list of step kinds an engine knows.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::step::DynStep;

/// Kinds by name. Built as a readable list:
/// `Registry::new().with(Transform).with(Http::new(client))`.
#[derive(Clone, Default)]
pub struct Registry {
    kinds: BTreeMap<&'static str, Arc<dyn DynStep>>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a kind. Panics on a duplicate name: that is a programming error in
    /// the list itself, found by the first test that builds it.
    pub fn with(mut self, step: impl DynStep + 'static) -> Self {
        let kind = step.kind();
        let previous = self.kinds.insert(kind, Arc::new(step));
        assert!(previous.is_none(), "step kind {kind:?} registered twice");
        self
    }

    pub fn get(&self, kind: &str) -> Option<&Arc<dyn DynStep>> {
        self.kinds.get(kind)
    }

    pub fn kinds(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.kinds.keys().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds::{Fail, Transform};

    #[test]
    fn lists_kinds_and_rejects_duplicates() {
        let registry = Registry::new().with(Transform).with(Fail);
        assert_eq!(registry.kinds().collect::<Vec<_>>(), ["fail", "transform"]);
        let again = std::panic::catch_unwind(|| Registry::new().with(Transform).with(Transform));
        assert!(again.is_err());
    }
}
