//! The image an RBD export names: `POOL[/NAMESPACE]/IMAGE[@SNAP]`, as `rbd` itself spells it.

use std::ffi::CString;
use std::fmt;

/// A parsed image spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RbdSpec {
    /// The pool.
    pub pool: String,
    /// The namespace in the pool ("" for the default one).
    pub namespace: String,
    /// The image.
    pub image: String,
    /// A snapshot of it, exported read-only.
    pub snapshot: Option<String>,
}

impl RbdSpec {
    /// Parses `POOL[/NAMESPACE]/IMAGE[@SNAP]`; the message says what is wrong.
    pub fn parse(s: &str) -> Result<RbdSpec, String> {
        let usage = "expected POOL/IMAGE, POOL/NAMESPACE/IMAGE or either with @SNAPSHOT";
        let (path, snapshot) = match s.split_once('@') {
            Some((p, snap)) => (p, Some(snap)),
            None => (s, None),
        };
        let parts: Vec<&str> = path.split('/').collect();
        let (pool, namespace, image) = match parts[..] {
            [pool, image] => (pool, "", image),
            [pool, ns, image] => (pool, ns, image),
            _ => return Err(format!("invalid RBD image '{s}': {usage}")),
        };
        let names = [("pool", pool), ("image", image)]
            .into_iter()
            .chain((!namespace.is_empty() || parts.len() == 3).then_some(("namespace", namespace)))
            .chain(snapshot.map(|n| ("snapshot", n)));
        for (what, name) in names {
            if name.is_empty() || name.contains(['@', '\0']) {
                return Err(format!(
                    "invalid RBD image '{s}': empty or bad {what} name ({usage})"
                ));
            }
        }
        Ok(RbdSpec {
            pool: pool.into(),
            namespace: namespace.into(),
            image: image.into(),
            snapshot: snapshot.map(String::from),
        })
    }
}

/// A name as a C string (parse refused NULs, so this cannot fail for parsed names).
pub(super) fn c(name: &str) -> CString {
    CString::new(name).unwrap_or_default()
}

impl fmt::Display for RbdSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/", self.pool)?;
        if !self.namespace.is_empty() {
            write!(f, "{}/", self.namespace)?;
        }
        write!(f, "{}", self.image)?;
        if let Some(s) = &self.snapshot {
            write!(f, "@{s}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_forms_rbd_knows_parse_and_print_back() {
        for s in ["rbd/vol1", "rbd/ns1/vol1", "rbd/vol1@snap1", "p/n/i@s"] {
            assert_eq!(RbdSpec::parse(s).unwrap().to_string(), s);
        }
        let spec = RbdSpec::parse("pool/ns/img@snap").unwrap();
        assert_eq!(
            (
                spec.pool.as_str(),
                spec.namespace.as_str(),
                spec.image.as_str()
            ),
            ("pool", "ns", "img")
        );
        assert_eq!(spec.snapshot.as_deref(), Some("snap"));
    }

    #[test]
    fn malformed_specs_are_refused_with_the_forms() {
        for s in [
            "",
            "vol1",
            "rbd/",
            "/vol1",
            "a/b/c/d",
            "rbd/vol1@",
            "rbd//vol1",
            "a/b@c@d",
            "a/b\0",
        ] {
            let e = RbdSpec::parse(s).unwrap_err();
            assert!(e.contains("POOL/IMAGE"), "{s:?}: {e}");
        }
    }
}
