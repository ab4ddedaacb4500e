//! Handshake slots: connections between accept and CONNACK (TLS handshake, CONNECT,
//! authentication), capped in total and per source address. When a cap is reached, the oldest
//! connection that has not yet delivered a complete CONNECT is shed to admit the newcomer, so idle
//! sockets held open by an attacker cannot lock a legitimate client out for their whole timeout.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use super::lock;

/// The unit the per-source cap counts by: an IPv4 address (IPv4-mapped IPv6 included), or an
/// IPv6 /64 (one host usually owns a whole /64, so counting single IPv6 addresses would not cap it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Source {
    V4(Ipv4Addr),
    V6Net(u64),
}

fn source_of(ip: IpAddr) -> Source {
    match ip {
        IpAddr::V4(a) => Source::V4(a),
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => Source::V4(v4),
            None => Source::V6Net((u128::from(a) >> 64) as u64),
        },
    }
}

struct Pending {
    source: Source,
    /// Notified when this connection is shed.
    shed: Arc<Notify>,
    /// A complete CONNECT has arrived: the connection is being authenticated, never shed.
    connect_read: bool,
}

#[derive(Default)]
struct Table {
    /// By connection id, i.e. in accept order: the first idle entry is the oldest.
    conns: BTreeMap<u64, Pending>,
    per_source: HashMap<Source, usize>,
}

impl Table {
    fn remove(&mut self, conn_id: u64) -> Option<Pending> {
        let p = self.conns.remove(&conn_id)?;
        if let Some(n) = self.per_source.get_mut(&p.source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_source.remove(&p.source);
            }
        }
        Some(p)
    }

    /// Sheds the oldest connection without a complete CONNECT among those `which` selects.
    fn shed_oldest(&mut self, which: impl Fn(&Pending) -> bool) -> Option<u64> {
        let id = self.conns.iter().find(|(_, p)| !p.connect_read && which(p)).map(|(id, _)| *id)?;
        if let Some(p) = self.remove(id) {
            p.shed.notify_one();
        }
        Some(id)
    }
}

/// The handshake slots of one server.
pub(crate) struct Prelogin {
    max_total: usize,
    max_per_source: usize,
    table: Mutex<Table>,
}

/// Why a connection could not be admitted: every connection holding a slot has already sent its
/// CONNECT (none can be shed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Full {
    /// The source's cap is reached.
    Source,
    /// The server-wide cap is reached.
    Total,
}

/// An admitted connection, and the older one shed to make room for it, if any.
pub(crate) struct Admitted {
    pub(crate) slot: Slot,
    pub(crate) shed: Option<u64>,
}

impl Prelogin {
    pub(crate) fn new(max_total: usize, max_per_source: usize) -> Arc<Prelogin> {
        Arc::new(Prelogin {
            max_total: max_total.max(1),
            max_per_source: max_per_source.max(1),
            table: Mutex::new(Table::default()),
        })
    }

    /// Takes a slot for connection `conn_id` from `ip`, shedding the oldest idle connection of the
    /// same source when that source is at its cap, else the oldest idle one overall when the
    /// server is at its cap.
    pub(crate) fn admit(self: &Arc<Self>, conn_id: u64, ip: IpAddr) -> Result<Admitted, Full> {
        let source = source_of(ip);
        let mut t = lock(&self.table);
        let mut shed = None;
        if t.per_source.get(&source).copied().unwrap_or(0) >= self.max_per_source {
            shed = Some(t.shed_oldest(|p| p.source == source).ok_or(Full::Source)?);
        }
        if t.conns.len() >= self.max_total {
            shed = Some(t.shed_oldest(|_| true).ok_or(Full::Total)?);
        }
        let notify = Arc::new(Notify::new());
        t.conns.insert(conn_id, Pending { source, shed: notify.clone(), connect_read: false });
        *t.per_source.entry(source).or_insert(0) += 1;
        Ok(Admitted { slot: Slot { owner: self.clone(), conn_id, shed: notify }, shed })
    }

    /// Connections holding a slot.
    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.table).conns.len()
    }
}

/// One connection's handshake slot, released on drop (after CONNACK, or when the connection ends
/// before it).
pub(crate) struct Slot {
    owner: Arc<Prelogin>,
    conn_id: u64,
    shed: Arc<Notify>,
}

impl Slot {
    /// Completes when the connection has been shed (it should close at once).
    pub(crate) async fn shed(&self) {
        self.shed.notified().await
    }

    /// Marks the CONNECT as received, so the connection is no longer shed. False if it was shed
    /// just before: its slot is already someone else's, so it must close.
    pub(crate) fn connect_received(&self) -> bool {
        match lock(&self.owner.table).conns.get_mut(&self.conn_id) {
            Some(p) => {
                p.connect_read = true;
                true
            }
            None => false,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        lock(&self.owner.table).remove(self.conn_id);
    }
}

/// Rate limit for a warning that an attacker can trigger per connection: at most one per
/// `every`, counting the ones suppressed in between.
pub(crate) struct Throttle {
    every: Duration,
    last: Option<tokio::time::Instant>,
    suppressed: u64,
}

impl Throttle {
    pub(crate) fn new(every: Duration) -> Throttle {
        Throttle { every, last: None, suppressed: 0 }
    }

    /// `Some(suppressed since the last warning)` if a warning may be logged now.
    pub(crate) fn allow(&mut self) -> Option<u64> {
        let now = tokio::time::Instant::now();
        if self.last.is_some_and(|t| now.duration_since(t) < self.every) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn per_source_cap_sheds_the_oldest_idle_of_that_source() {
        let p = Prelogin::new(10, 2);
        let a1 = p.admit(1, ip("10.0.0.1")).unwrap();
        let a2 = p.admit(2, ip("10.0.0.1")).unwrap();
        let b = p.admit(3, ip("10.0.0.2")).unwrap();
        assert!(a1.slot.connect_received());
        // 10.0.0.1 is at its cap: its oldest idle (2, as 1 has sent its CONNECT) goes.
        let a3 = p.admit(4, ip("10.0.0.1")).unwrap();
        assert_eq!(a3.shed, Some(2));
        assert!(!a2.slot.connect_received(), "a shed connection must close");
        assert!(a3.slot.connect_received());
        // Every slot of 10.0.0.1 is authenticating: the newcomer is refused.
        assert_eq!(p.admit(5, ip("10.0.0.1")).err(), Some(Full::Source));
        drop((a1, a2, b, a3));
        assert_eq!(p.len(), 0);
    }

    #[test]
    fn total_cap_sheds_the_oldest_idle_overall() {
        let p = Prelogin::new(3, 3);
        let s: Vec<_> = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
            .iter()
            .enumerate()
            .map(|(i, a)| p.admit(i as u64, ip(a)).unwrap())
            .collect();
        assert!(s[0].slot.connect_received());
        let n = p.admit(9, ip("10.0.0.9")).unwrap();
        assert_eq!(n.shed, Some(1));
        assert_eq!(p.len(), 3);
        assert!(s[2].slot.connect_received() && n.slot.connect_received());
        assert_eq!(p.admit(10, ip("10.0.0.10")).err(), Some(Full::Total));
    }

    #[test]
    fn ipv6_counts_by_64_and_mapped_v4_as_v4() {
        assert_eq!(source_of(ip("2001:db8::1")), source_of(ip("2001:db8::ffff:1")));
        assert_ne!(source_of(ip("2001:db8::1")), source_of(ip("2001:db8:0:1::1")));
        assert_eq!(source_of(ip("::ffff:127.0.0.1")), source_of(ip("127.0.0.1")));
    }
}
