//! Limits on what clients can take from the appliance: file descriptors, counts per key (source
//! address, tenant), and a throttle for log lines that a client can make repeat.
//!
//! Descriptors are the resource every part shares: the store, the dispatch log, the watcher's
//! inotify handle, the admin socket and the log all need one, and a client that opens sockets and
//! files could otherwise take them all (then the watcher fails with EMFILE and `smsdrop status`
//! hangs). At start the soft limit is raised to the hard one, and clients (SFTP connections and
//! handles, HTTP connections) draw from a budget that leaves a reserve nobody outside can take: a
//! quarter of the limit, at least [`RESERVED_FDS`].

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Descriptors kept out of clients' reach, at least.
pub const RESERVED_FDS: u64 = 256;

/// The descriptor budget of clients.
pub struct Descriptors {
    slots: Arc<Semaphore>,
    /// The process's descriptor limit (after raising it).
    pub limit: u64,
    /// What clients may hold at once.
    pub budget: usize,
}

/// One descriptor a client holds: given back when dropped.
pub type Descriptor = OwnedSemaphorePermit;

/// Raises the soft descriptor limit to the hard one; returns the soft limit in force.
fn raise_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    lim.rlim_cur
}

/// The budget for a limit: everything but the reserve.
fn budget(limit: u64) -> usize {
    let reserve = (limit / 4).max(RESERVED_FDS);
    // Semaphore::MAX_PERMITS is usize::MAX >> 3; a limit of "unlimited" is capped well below.
    limit.saturating_sub(reserve).min(1 << 24) as usize
}

/// The process-wide descriptor budget (raising the limit on first use).
pub fn descriptors() -> &'static Descriptors {
    static D: OnceLock<Descriptors> = OnceLock::new();
    D.get_or_init(|| {
        let limit = raise_limit();
        let budget = budget(limit);
        Descriptors {
            slots: Arc::new(Semaphore::new(budget)),
            limit,
            budget,
        }
    })
}

impl Descriptors {
    /// One descriptor, or `None` when clients hold the whole budget.
    pub fn try_take(&self) -> Option<Descriptor> {
        self.slots.clone().try_acquire_owned().ok()
    }

    /// One descriptor, waiting until a client gives one back.
    pub async fn take(&self) -> Descriptor {
        // The semaphore is never closed.
        loop {
            if let Ok(p) = self.slots.clone().acquire_owned().await {
                return p;
            }
        }
    }

    /// Descriptors clients hold now.
    pub fn in_use(&self) -> usize {
        self.budget - self.slots.available_permits()
    }
}

/// Counts held per key (a source address, a tenant), each under a limit given when taking.
pub struct Counter<K: Eq + Hash + Clone> {
    held: Mutex<HashMap<K, usize>>,
}

impl<K: Eq + Hash + Clone> Default for Counter<K> {
    fn default() -> Self {
        Counter {
            held: Mutex::new(HashMap::new()),
        }
    }
}

/// One count held under a key; given back when dropped.
pub struct Held<K: Eq + Hash + Clone> {
    counter: Arc<Counter<K>>,
    key: K,
}

impl<K: Eq + Hash + Clone> Counter<K> {
    /// Takes one under `key` unless `limit` are already held.
    pub fn try_take(self: &Arc<Self>, key: K, limit: usize) -> Option<Held<K>> {
        let mut held = self.held.lock().ok()?;
        let n = held.entry(key.clone()).or_default();
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(Held {
            counter: self.clone(),
            key,
        })
    }

    /// How many are held under `key`.
    pub fn count(&self, key: &K) -> usize {
        self.held.lock().map(|h| h.get(key).copied().unwrap_or(0)).unwrap_or(0)
    }
}

impl<K: Eq + Hash + Clone> Drop for Held<K> {
    fn drop(&mut self) {
        if let Ok(mut held) = self.counter.held.lock() {
            if let Some(n) = held.get_mut(&self.key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    held.remove(&self.key);
                }
            }
        }
    }
}

/// Lets a repeated log line through at most once per `every` and key, and says how many were
/// held back meanwhile. A client that can make a warning repeat cannot fill the log with it.
pub struct Throttle {
    every: Duration,
    seen: Mutex<std::collections::BTreeMap<String, (Instant, u64)>>,
}

/// Keys remembered at most; past it the oldest memory is dropped (a flood of distinct keys then
/// writes at most this many lines per `every`).
const THROTTLE_KEYS: usize = 1024;

impl Throttle {
    pub const fn new(every: Duration) -> Throttle {
        Throttle {
            every,
            seen: Mutex::new(std::collections::BTreeMap::new()),
        }
    }

    /// `Some(held back)` when a line for `key` may be written now, with how many were held back
    /// since the last one; `None` when this one is held back.
    pub fn allow(&self, key: &str) -> Option<u64> {
        let now = Instant::now();
        let mut seen = self.seen.lock().ok()?;
        if let Some((at, held)) = seen.get_mut(key) {
            if now.duration_since(*at) < self.every {
                *held += 1;
                return None;
            }
            let was = *held;
            *at = now;
            *held = 0;
            return Some(was);
        }
        if seen.len() >= THROTTLE_KEYS {
            let every = self.every;
            seen.retain(|_, (at, _)| now.duration_since(*at) < every);
            if seen.len() >= THROTTLE_KEYS {
                return None;
            }
        }
        seen.insert(key.to_string(), (now, 0));
        Some(0)
    }
}

/// Whether a character must never reach a log line, a file name or a mail as it is: a control
/// character (newlines included) or a Unicode mark that reorders text on screen.
fn is_unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}')
}

/// Whether a name (of a file, a user) holds any such character.
pub fn has_unsafe_chars(name: &str) -> bool {
    name.chars().any(is_unsafe_char)
}

/// A name as it may be shown in a log line or a mail: unsafe characters escaped (`\n`,
/// `\u{202e}`), cut to 256 characters.
pub fn shown(name: &str) -> String {
    let mut out = String::with_capacity(name.len().min(256));
    for (i, c) in name.chars().enumerate() {
        if i == 256 {
            out.push('…');
            break;
        }
        if is_unsafe_char(c) {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_keeps_a_reserve() {
        assert_eq!(budget(1024), 768);
        assert_eq!(budget(300), 44);
        assert_eq!(budget(100), 0);
        assert_eq!(budget(524_288), 393_216);
        assert_eq!(budget(u64::MAX), 1 << 24);
    }

    #[test]
    fn counter_limits_per_key_and_gives_back() {
        let c: Arc<Counter<&str>> = Arc::default();
        let a = c.try_take("a", 2).expect("first");
        let _b = c.try_take("a", 2).expect("second");
        assert!(c.try_take("a", 2).is_none());
        assert!(c.try_take("b", 2).is_some());
        drop(a);
        assert_eq!(c.count(&"a"), 1);
        assert!(c.try_take("a", 2).is_some());
    }

    #[test]
    fn throttle_lets_one_line_through_and_counts_the_rest() {
        let t = Throttle::new(Duration::from_secs(3600));
        assert_eq!(t.allow("x"), Some(0));
        assert_eq!(t.allow("x"), None);
        assert_eq!(t.allow("x"), None);
        assert_eq!(t.allow("y"), Some(0));
        let t = Throttle::new(Duration::ZERO);
        assert_eq!(t.allow("x"), Some(0));
        assert_eq!(t.allow("x"), Some(0));
    }

    #[test]
    fn names_with_control_characters_are_escaped() {
        assert!(has_unsafe_chars("a\nb"));
        assert!(has_unsafe_chars("evil\u{202e}vsc.csv"));
        assert!(has_unsafe_chars("a\tb"));
        assert!(!has_unsafe_chars("juin été.csv"));
        assert_eq!(shown("a\nINFO forged"), "a\\nINFO forged");
        assert_eq!(shown("x\u{202e}y"), "x\\u{202e}y");
        assert_eq!(shown(&"a".repeat(300)).chars().count(), 257);
    }
}
