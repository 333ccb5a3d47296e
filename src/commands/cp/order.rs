//! Checks that a walk from the guest is a well-formed pre-order listing, entry by entry.
//!
//! The guest is hostile: its walk may send a child before its parent, the same name
//! twice, a path below a file or symlink, or a name that is not one component. [`Tree`]
//! keeps the chain of directories the walk is currently inside (the copy holds one open
//! destination directory per level in its payload `T`) and accepts an entry only if its
//! parent is on that chain, i.e. a directory this same copy entered just before. Every
//! other order is refused, so the copy never has to look anything up by path.

use imgsafe_proto::validate_name;
use std::collections::HashSet;

/// Deepest path a copy accepts. Each level holds one open directory, and 512 stays well
/// inside the usual soft limit of 1024 descriptors; the guest's read requests stop at
/// PATH_MAX long before a real tree gets this deep.
pub const MAX_DEPTH: usize = 512;

/// Why an entry was refused; the caller adds the entry's path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrderError {
    /// A walk entry with no components.
    #[error("empty path")]
    EmptyPath,
    /// A component is not a single safe name.
    #[error("unsafe name {name}: {why}")]
    BadName {
        name: String,
        why: imgsafe_proto::NameError,
    },
    /// More than [`MAX_DEPTH`] components.
    #[error("more than {MAX_DEPTH} levels deep")]
    TooDeep,
    /// The parent is not the directory being walked: out of order, or below a file or symlink.
    #[error("its parent is not a directory listed just before it (out of order, or below a file or symlink)")]
    NotInWalkedDir,
    /// The same name twice in one directory.
    #[error("listed twice")]
    Duplicate,
}

struct Level<T> {
    name: Vec<u8>,
    /// Names already placed in this directory by this copy.
    names: HashSet<Vec<u8>>,
    data: T,
}

/// The chain of directories a pre-order walk is inside, each with a payload.
pub struct Tree<T> {
    /// Names already placed in the top-level destination directory.
    top_names: HashSet<Vec<u8>>,
    levels: Vec<Level<T>>,
}

impl<T> Tree<T> {
    /// An empty chain: the next entry must be a top-level one.
    pub fn new() -> Self {
        Tree {
            top_names: HashSet::new(),
            levels: Vec::new(),
        }
    }

    /// Accept the entry at `path` (components below the top-level destination): validate
    /// every component, leave the directories the walk has finished (returned innermost
    /// first, for their final mode and mtime), and record the name in its parent.
    pub fn step(&mut self, path: &[Vec<u8>]) -> Result<Vec<T>, OrderError> {
        let Some((name, parent)) = path.split_last() else {
            return Err(OrderError::EmptyPath);
        };
        for c in path {
            validate_name(c).map_err(|why| OrderError::BadName {
                name: super::show(c),
                why,
            })?;
        }
        if path.len() > MAX_DEPTH {
            return Err(OrderError::TooDeep);
        }
        let on_chain = parent.len() <= self.levels.len()
            && self
                .levels
                .iter()
                .zip(parent)
                .all(|(level, p)| level.name == *p);
        if !on_chain {
            return Err(OrderError::NotInWalkedDir);
        }
        let names = match parent.len() {
            0 => &self.top_names,
            n => &self.levels[n - 1].names,
        };
        if names.contains(name) {
            return Err(OrderError::Duplicate);
        }
        let left: Vec<T> = self
            .levels
            .drain(parent.len()..)
            .rev()
            .map(|l| l.data)
            .collect();
        let names = match self.levels.last_mut() {
            Some(level) => &mut level.names,
            None => &mut self.top_names,
        };
        names.insert(name.clone());
        Ok(left)
    }

    /// The innermost directory the walk is in (None: the top-level destination).
    pub fn current(&self) -> Option<&T> {
        self.levels.last().map(|l| &l.data)
    }

    /// Enter the directory `name`, just accepted by [`Tree::step`].
    pub fn enter(&mut self, name: &[u8], data: T) {
        self.levels.push(Level {
            name: name.to_vec(),
            names: HashSet::new(),
            data,
        });
    }

    /// Leave every directory still open, innermost first.
    pub fn finish(mut self) -> Vec<T> {
        self.levels.drain(..).rev().map(|l| l.data).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(parts: &[&str]) -> Vec<Vec<u8>> {
        parts.iter().map(|s| s.as_bytes().to_vec()).collect()
    }

    #[test]
    fn pre_order_walk_is_accepted_and_leaves_dirs_innermost_first() {
        let mut t = Tree::new();
        t.step(&p(&["a"])).unwrap();
        t.enter(b"a", "a");
        t.step(&p(&["a", "b"])).unwrap();
        t.enter(b"b", "a/b");
        t.step(&p(&["a", "b", "f"])).unwrap();

        let left = t.step(&p(&["c"])).unwrap();

        assert_eq!(left, vec!["a/b", "a"]);
    }

    #[test]
    fn child_before_its_parent_is_refused() {
        let mut t: Tree<()> = Tree::new();

        let err = t.step(&p(&["a", "f"])).unwrap_err();

        assert_eq!(err, OrderError::NotInWalkedDir);
    }

    #[test]
    fn entry_below_a_non_directory_is_refused() {
        let mut t: Tree<()> = Tree::new();
        t.step(&p(&["link"])).unwrap();

        let err = t.step(&p(&["link", "passwd"])).unwrap_err();

        assert_eq!(err, OrderError::NotInWalkedDir);
    }

    #[test]
    fn returning_to_a_finished_directory_is_refused() {
        let mut t = Tree::new();
        t.step(&p(&["a"])).unwrap();
        t.enter(b"a", ());
        t.step(&p(&["b"])).unwrap();

        let err = t.step(&p(&["a", "late"])).unwrap_err();

        assert_eq!(err, OrderError::NotInWalkedDir);
    }

    #[test]
    fn same_name_twice_is_refused() {
        let mut t = Tree::new();
        t.step(&p(&["a"])).unwrap();
        t.enter(b"a", ());
        t.step(&p(&["a", "x"])).unwrap();

        let err = t.step(&p(&["a"])).unwrap_err();

        assert_eq!(err, OrderError::Duplicate);
    }

    #[test]
    fn dot_dot_component_is_refused() {
        let mut t = Tree::new();
        t.step(&p(&["a"])).unwrap();
        t.enter(b"a", ());

        let err = t.step(&p(&["a", ".."])).unwrap_err();

        assert!(matches!(err, OrderError::BadName { .. }));
    }

    #[test]
    fn empty_path_is_refused() {
        let mut t: Tree<()> = Tree::new();

        let err = t.step(&[]).unwrap_err();

        assert_eq!(err, OrderError::EmptyPath);
    }

    #[test]
    fn too_deep_path_is_refused() {
        let mut t: Tree<()> = Tree::new();
        let deep = vec![b"d".to_vec(); MAX_DEPTH + 1];

        let err = t.step(&deep).unwrap_err();

        assert_eq!(err, OrderError::TooDeep);
    }
}
