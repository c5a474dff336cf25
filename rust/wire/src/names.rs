//! Client-side view of prepared statements and portals, so an Execute can be traced
//! back to the SQL text it runs (portal -> statement -> text).  Names are the bytes the
//! client sent: the server reads them in the client encoding, which need not be UTF-8.

use std::sync::Arc;

use ahash::AHashMap as HashMap;

/// A portal as bound: the text of its statement at Bind time, and its parameters
/// pre-rendered for the record.
#[derive(Debug, Clone)]
pub(crate) struct Portal {
    pub(crate) sql: Arc<str>,
    pub(crate) params: Option<Arc<str>>,
}

/// The unnamed statement and portal are used for nearly every extended-protocol query,
/// so they live outside the maps.
#[derive(Debug, Default)]
pub(crate) struct PreparedNames {
    unnamed_statement: Option<Arc<str>>,
    statements: HashMap<Box<[u8]>, Arc<str>>,
    unnamed_portal: Option<Portal>,
    portals: HashMap<Box<[u8]>, Portal>,
}

impl PreparedNames {
    pub(crate) fn define_statement(&mut self, name: &[u8], sql: Arc<str>) {
        if name.is_empty() {
            self.unnamed_statement = Some(sql);
        } else {
            self.statements.insert(name.into(), sql);
        }
    }

    pub(crate) fn statement(&self, name: &[u8]) -> Option<&Arc<str>> {
        if name.is_empty() {
            self.unnamed_statement.as_ref()
        } else {
            self.statements.get(name)
        }
    }

    pub(crate) fn bind_portal(&mut self, name: &[u8], portal: Portal) {
        if name.is_empty() {
            self.unnamed_portal = Some(portal);
        } else {
            self.portals.insert(name.into(), portal);
        }
    }

    pub(crate) fn portal(&self, name: &[u8]) -> Option<&Portal> {
        if name.is_empty() {
            self.unnamed_portal.as_ref()
        } else {
            self.portals.get(name)
        }
    }

    pub(crate) fn close_statement(&mut self, name: &[u8]) {
        if name.is_empty() {
            self.unnamed_statement = None;
        } else {
            self.statements.remove(name);
        }
    }

    pub(crate) fn close_portal(&mut self, name: &[u8]) {
        if name.is_empty() {
            self.unnamed_portal = None;
        } else {
            self.portals.remove(name);
        }
    }

    /// Portals last until the end of their transaction.
    pub(crate) fn end_transaction(&mut self) {
        self.unnamed_portal = None;
        if !self.portals.is_empty() {
            self.portals.clear();
        }
    }
}
