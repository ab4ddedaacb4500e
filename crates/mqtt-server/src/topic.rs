//! Topic names, topic filters, matching, and the own-prefix ACL of [`OwnPrefix`](super::OwnPrefix).
//!
//! These are written here rather than taken from `rumqttc::mqttbytes` because that crate's
//! `matches` slices the topic at byte 1 (`topic[..1]`), which panics on a topic whose first
//! character is multi-byte UTF-8 — a panic any client could trigger.

/// Checks an identity returned by an [`Authenticator`](super::Authenticator): non-empty, at most
/// 1024 bytes, no `/` (so one identity can never be a prefix of another's topics), no wildcard
/// characters, no NUL, and not starting with `$` (reserved for server topics).
pub fn valid_identity(identity: &str) -> bool {
    !identity.is_empty()
        && identity.len() <= 1024
        && !identity.starts_with('$')
        && !identity.contains(['/', '+', '#', '\0'])
}

/// A topic name a PUBLISH may carry: non-empty, at most 65535 bytes, no wildcards, no NUL.
pub fn valid_topic(topic: &str) -> bool {
    !topic.is_empty() && topic.len() <= usize::from(u16::MAX) && !topic.contains(['+', '#', '\0'])
}

/// A topic filter a SUBSCRIBE may carry (MQTT 3.1.1 §4.7): non-empty, at most 65535 bytes, no
/// NUL, `+` only as a whole level, `#` only as the whole last level.
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.len() > usize::from(u16::MAX) || filter.contains('\0') {
        return false;
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let last = levels.peek().is_none();
        if level.contains('#') && (level != "#" || !last) {
            return false;
        }
        if level.contains('+') && level != "+" {
            return false;
        }
    }
    true
}

/// Does `topic` (a topic name) match `filter` (a valid topic filter)? MQTT 3.1.1 §4.7: `+` is one
/// level, `#` is any number of levels including zero (`a/#` matches `a`), and a topic starting
/// with `$` is not matched by a filter starting with a wildcard.
pub fn matches(topic: &str, filter: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut t = topic.split('/');
    for f in filter.split('/') {
        if f == "#" {
            return true;
        }
        match t.next() {
            None => return false,
            Some(level) if f != "+" && f != level => return false,
            Some(_) => {}
        }
    }
    t.next().is_none()
}

/// The part of `s` after `{identity}/`, if it is non-empty.
fn own_suffix<'a>(identity: &str, s: &'a str) -> Option<&'a str> {
    s.strip_prefix(identity)?.strip_prefix('/').filter(|rest| !rest.is_empty())
}

/// ACL for PUBLISH: `topic` is a valid topic name under `{identity}/`. `identity` must be a
/// [`valid_identity`] (the server refuses any other at CONNECT): an identity containing `/` would
/// allow topics another identity owns.
pub fn topic_allowed(identity: &str, topic: &str) -> bool {
    valid_topic(topic) && own_suffix(identity, topic).is_some()
}

/// ACL for SUBSCRIBE: `filter` is a valid filter that starts with `{identity}/` literally, so
/// wildcards can only appear after the client's own prefix (`#`, `+/vls`, `$SYS/#` are refused).
/// `identity` must be a [`valid_identity`], as for [`topic_allowed`].
pub fn filter_allowed(identity: &str, filter: &str) -> bool {
    valid_filter(filter) && own_suffix(identity, filter).is_some()
}

/// The identity a topic belongs to: its first level (identities contain no `/`).
pub fn owner(topic: &str) -> Option<&str> {
    topic.split_once('/').map(|(id, _)| id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters() {
        assert!(valid_filter("a/#"));
        assert!(valid_filter("a/+/c"));
        assert!(valid_filter("#"));
        assert!(!valid_filter(""));
        assert!(!valid_filter("a/#/c"));
        assert!(!valid_filter("a/b#"));
        assert!(!valid_filter("a/b+/c"));
    }

    #[test]
    fn matching() {
        assert!(matches("a/b", "a/b"));
        assert!(matches("a/b", "a/+"));
        assert!(matches("a/b/c", "a/#"));
        assert!(matches("a", "a/#"));
        assert!(!matches("a/b/c", "a/+"));
        assert!(!matches("a", "a/+"));
        assert!(!matches("a/b", "a/b/c"));
        assert!(!matches("$SYS/x", "#"));
        assert!(!matches("$SYS/x", "+/x"));
        assert!(matches("$SYS/x", "$SYS/#"));
        // Would panic in rumqttc's `matches`.
        assert!(!matches("é/x", "a/#"));
    }

    /// The property the `mqtt_packet` fuzz target checks, on a small exhaustive set: a filter
    /// granted to a valid identity only matches that identity's topics (or the bare identity,
    /// which has no owner and is never routed).
    #[test]
    fn granted_filters_never_match_foreign_topics() {
        let ids = ["a", "ab", "02ab", "é"];
        let parts = ["a", "ab", "b", "é", "+", "#", "", "$SYS"];
        let mut names = Vec::new();
        for x in parts {
            names.push(x.to_string());
            for y in parts {
                names.push(format!("{x}/{y}"));
                for z in parts {
                    names.push(format!("{x}/{y}/{z}"));
                }
            }
        }
        for id in ids {
            assert!(valid_identity(id));
            for f in names.iter().filter(|f| filter_allowed(id, f)) {
                for t in names.iter().filter(|t| valid_topic(t) && matches(t, f)) {
                    assert!(t == id || owner(t) == Some(id), "{f:?} of {id:?} matches {t:?}");
                }
            }
            for t in names.iter().filter(|t| topic_allowed(id, t)) {
                assert_eq!(owner(t), Some(id));
            }
        }
    }

    #[test]
    fn acl() {
        assert!(topic_allowed("alice", "alice/vls"));
        assert!(!topic_allowed("alice", "alice"));
        assert!(!topic_allowed("alice", "alice/"));
        assert!(!topic_allowed("alice", "alicex/vls"));
        assert!(!topic_allowed("alice", "bob/vls"));
        assert!(!topic_allowed("alice", "alice/+"));
        assert!(filter_allowed("alice", "alice/vls"));
        assert!(filter_allowed("alice", "alice/#"));
        assert!(filter_allowed("alice", "alice/+"));
        assert!(!filter_allowed("alice", "#"));
        assert!(!filter_allowed("alice", "+/vls"));
        assert!(!filter_allowed("alice", "$SYS/#"));
        assert!(!filter_allowed("alice", "alice"));
        assert!(!filter_allowed("alice", "alicex/#"));
        assert!(!filter_allowed("alice", "bob/#"));
        assert!(valid_identity("02abcdef"));
        assert!(!valid_identity(""));
        assert!(!valid_identity("a/b"));
        assert!(!valid_identity("a+"));
        assert!(!valid_identity("$SYS"));
    }
}
