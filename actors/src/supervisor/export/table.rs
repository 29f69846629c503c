//! The export table: every block export, whatever its front, newest first (the
//! order qsd lists and deletes them in).

use bulkhead_ipc::wire::{ExportKey, WorkerId};

use super::nbd::NbdOptions;

/// One block export.
#[derive(Debug, Clone)]
pub struct Export {
    /// QMP id.
    pub id: String,
    /// The supervisor's number for it on the wire (never reused).
    pub key: ExportKey,
    /// Exported node.
    pub node: String,
    /// Clients may write.
    pub writable: bool,
    /// `allow-inactive`: the export neither activates its node nor stops it from
    /// being inactivated.
    pub allow_inactive: bool,
    /// Removal requested, clients still attached.
    pub shutting_down: bool,
    /// The instance serving this export alone (`--isolation image`), once placed;
    /// `None` when its front's shared instance serves it.
    pub worker: Option<WorkerId>,
    /// The front and its own options.
    pub front: Front,
    /// The mapping its serving worker holds (see `mapped.rs`).
    pub mapped: Option<super::mapped::Granted>,
}

/// The front an export is served through, with the options only it has. A new export
/// type is a new variant here (and a module beside `nbd.rs`).
#[derive(Debug, Clone)]
pub enum Front {
    /// NBD (`type: nbd`).
    Nbd(NbdOptions),
}

impl Front {
    /// The QAPI `BlockExportType` name.
    pub fn type_name(&self) -> &'static str {
        match self {
            Front::Nbd(_) => "nbd",
        }
    }
}

/// Every export, newest first.
#[derive(Debug, Default)]
pub struct ExportTable {
    list: Vec<Export>,
    next_key: u64,
}

impl ExportTable {
    /// A key no export has had.
    pub fn new_key(&mut self) -> ExportKey {
        self.next_key += 1;
        ExportKey(self.next_key)
    }

    /// Every export, newest first.
    pub fn iter(&self) -> std::slice::Iter<'_, Export> {
        self.list.iter()
    }

    /// Export `id`.
    pub fn get(&self, id: &str) -> Option<&Export> {
        self.list.iter().find(|e| e.id == id)
    }

    /// Export `id`, to change.
    pub fn get_mut(&mut self, id: &str) -> Option<&mut Export> {
        self.list.iter_mut().find(|e| e.id == id)
    }

    /// The export with wire key `key`.
    pub fn by_key(&self, key: ExportKey) -> Option<&Export> {
        self.list.iter().find(|e| e.key == key)
    }

    /// The export with wire key `key`, to change.
    pub fn by_key_mut(&mut self, key: ExportKey) -> Option<&mut Export> {
        self.list.iter_mut().find(|e| e.key == key)
    }

    /// Every export, to change.
    pub fn iter_mut(&mut self) -> std::slice::IterMut<'_, Export> {
        self.list.iter_mut()
    }

    /// Whether export `id` exists.
    pub fn contains(&self, id: &str) -> bool {
        self.get(id).is_some()
    }

    /// Ids of every export, newest first.
    pub fn ids(&self) -> Vec<String> {
        self.list.iter().map(|e| e.id.clone()).collect()
    }

    /// Adds `export` as the newest.
    pub fn insert(&mut self, export: Export) {
        self.list.insert(0, export);
    }

    /// Takes export `id` out.
    pub fn remove(&mut self, id: &str) -> Option<Export> {
        let pos = self.list.iter().position(|e| e.id == id)?;
        Some(self.list.remove(pos))
    }
}

impl<'a> IntoIterator for &'a ExportTable {
    type Item = &'a Export;
    type IntoIter = std::slice::Iter<'a, Export>;
    fn into_iter(self) -> Self::IntoIter {
        self.list.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export(id: &str, key: ExportKey) -> Export {
        Export {
            id: id.into(),
            key,
            node: "n".into(),
            writable: false,
            allow_inactive: false,
            shutting_down: false,
            worker: None,
            front: Front::Nbd(NbdOptions {
                name: id.into(),
                description: None,
                allocation_depth: false,
                bitmaps: Vec::new(),
            }),
            mapped: None,
        }
    }

    #[test]
    fn newest_first_and_keys_are_never_reused() {
        let mut t = ExportTable::default();
        let a = t.new_key();
        t.insert(export("a", a));
        let b = t.new_key();
        t.insert(export("b", b));
        assert_eq!(t.ids(), ["b", "a"]);
        assert_eq!(t.by_key(a).map(|e| e.id.as_str()), Some("a"));
        assert!(t.remove("a").is_some());
        assert!(t.by_key(a).is_none());
        let again = t.new_key();
        assert!(again != a && again != b);
        t.insert(export("a", again));
        assert!(
            t.by_key(a).is_none(),
            "a late report about the old 'a' misses"
        );
        assert_eq!(t.get("a").map(|e| e.key), Some(again));
        assert_eq!(t.iter().next().map(|e| e.front.type_name()), Some("nbd"));
    }
}
