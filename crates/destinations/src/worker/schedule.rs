//! Per-user queues of one worker: which events may go next so that one user's
//! events reach the receiver in log order while other users keep flowing.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::sink::Item;

pub(super) enum Slot {
    Ready(Item),
    /// An accepted live event not held in memory.
    Deferred {
        seq: u64,
        maybe_dup: bool,
    },
}

#[derive(Default)]
pub(super) struct UserQueue {
    pub(super) slots: VecDeque<Slot>,
    /// `Ready` slots in `slots`.
    pub(super) loaded: usize,
    pub(super) busy: bool,
}

/// Per-user queues. Invariant: a user is in `ready` iff it is not busy and its
/// queue starts with a `Ready` slot; in `needs_load` iff not busy and its queue
/// starts with a `Deferred` slot.
#[derive(Default)]
pub(super) struct Scheduler {
    pub(super) users: HashMap<Arc<str>, UserQueue>,
    pub(super) ready: VecDeque<Arc<str>>,
    pub(super) needs_load: Vec<Arc<str>>,
    /// Events in memory: queued `Ready` slots plus events in flight.
    pub(super) loaded: usize,
    /// `Deferred` slots.
    pub(super) deferred: usize,
}

impl Scheduler {
    pub(super) fn push(&mut self, item: Item, defer_over: usize) {
        let user = item.user.clone();
        let q = self.users.entry(user.clone()).or_default();
        let was_empty = q.slots.is_empty();
        if item.live && q.loaded >= defer_over {
            q.slots.push_back(Slot::Deferred {
                seq: item.seq(),
                maybe_dup: item.maybe_dup,
            });
            self.deferred += 1;
        } else {
            q.slots.push_back(Slot::Ready(item));
            q.loaded += 1;
            self.loaded += 1;
        }
        if was_empty && !q.busy {
            match q.slots.front() {
                Some(Slot::Ready(_)) => self.ready.push_back(user),
                _ => self.needs_load.push(user),
            }
        }
    }

    /// The next batch: head events of ready users, in their order, up to the limits.
    pub(super) fn next_batch(&mut self, max_events: usize, max_bytes: usize) -> Option<Vec<Item>> {
        let mut items: Vec<Item> = Vec::new();
        let mut bytes = 0usize;
        while items.len() < max_events {
            let Some(user) = self.ready.pop_front() else {
                break;
            };
            let Some(q) = self.users.get_mut(&user) else {
                continue;
            };
            if q.busy {
                continue;
            }
            let mut took = 0;
            while items.len() < max_events {
                match q.slots.front() {
                    Some(Slot::Ready(it)) => {
                        if !items.is_empty() && bytes + it.size() > max_bytes {
                            break;
                        }
                        bytes += it.size();
                        if let Some(Slot::Ready(it)) = q.slots.pop_front() {
                            items.push(it);
                        }
                        q.loaded -= 1;
                        took += 1;
                    }
                    _ => break,
                }
            }
            if took == 0 {
                match q.slots.front() {
                    Some(Slot::Deferred { .. }) => self.needs_load.push(user),
                    Some(Slot::Ready(_)) => {
                        self.ready.push_front(user);
                        break;
                    }
                    None => {
                        self.users.remove(&user);
                    }
                }
                continue;
            }
            q.busy = true;
        }
        (!items.is_empty()).then_some(items)
    }

    /// A batch of these users ended: they may go again.
    pub(super) fn release(&mut self, items: &[Item]) {
        self.loaded = self.loaded.saturating_sub(items.len());
        for item in items {
            let Some(q) = self.users.get_mut(&item.user) else {
                continue;
            };
            if !q.busy {
                continue;
            }
            q.busy = false;
            match q.slots.front() {
                Some(Slot::Ready(_)) => self.ready.push_back(item.user.clone()),
                Some(Slot::Deferred { .. }) => self.needs_load.push(item.user.clone()),
                None => {
                    self.users.remove(&item.user);
                }
            }
        }
    }

    /// Puts a batch back at the front of its users' queues (after a task died).
    pub(super) fn requeue(&mut self, items: Vec<Item>) {
        for item in items.into_iter().rev() {
            let q = self.users.entry(item.user.clone()).or_default();
            q.loaded += 1;
            q.slots.push_front(Slot::Ready(item));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::PER_USER_QUEUE;
    use serde_json::json;
    use tributary_eventlog::Record;

    fn item(seq: u64, user: &str) -> Item {
        let payload =
            json!({"type":"track","event":"E","userId":user,"messageId":format!("m{seq}")});
        Item::from_record(
            Record {
                partition: 0,
                seq,
                source_id: "s".into(),
                message_id: format!("m{seq}"),
                call_type: tributary_eventlog::CallType::Track,
                user_id: Some(user.into()),
                anonymous_id: None,
                event: Some("E".into()),
                received_at_ms: 0,
                payload: payload.to_string(),
            },
            true,
        )
        .unwrap()
    }

    fn seqs(items: &[Item]) -> Vec<u64> {
        items.iter().map(Item::seq).collect()
    }

    #[test]
    fn busy_user_waits_others_flow() {
        let mut s = Scheduler::default();
        for (seq, u) in [(1, "a"), (2, "a"), (3, "b"), (4, "a"), (5, "c")] {
            s.push(item(seq, u), PER_USER_QUEUE);
        }
        let b1 = s.next_batch(2, usize::MAX).unwrap();
        assert_eq!(seqs(&b1), vec![1, 2], "a's head events, in order");
        let b2 = s.next_batch(10, usize::MAX).unwrap();
        assert_eq!(seqs(&b2), vec![3, 5], "a is busy; b and c flow");
        assert!(s.next_batch(10, usize::MAX).is_none());
        s.release(&b1);
        let b3 = s.next_batch(10, usize::MAX).unwrap();
        assert_eq!(seqs(&b3), vec![4]);
        s.release(&b2);
        s.release(&b3);
        assert!(s.users.is_empty());
        assert_eq!(s.loaded, 0);
    }

    #[test]
    fn byte_limit_keeps_at_least_one_event() {
        let mut s = Scheduler::default();
        s.push(item(1, "a"), PER_USER_QUEUE);
        s.push(item(2, "b"), PER_USER_QUEUE);
        let b = s.next_batch(10, 1).unwrap();
        assert_eq!(seqs(&b), vec![1]);
        let b = s.next_batch(10, 1).unwrap();
        assert_eq!(seqs(&b), vec![2]);
    }

    #[test]
    fn hot_user_overflow_is_deferred() {
        let mut s = Scheduler::default();
        for seq in 1..=5 {
            s.push(item(seq, "hot"), 2);
        }
        assert_eq!(s.loaded, 2);
        assert_eq!(s.deferred, 3);
        let b = s.next_batch(10, usize::MAX).unwrap();
        assert_eq!(seqs(&b), vec![1, 2]);
        s.release(&b);
        assert_eq!(s.needs_load.len(), 1, "deferred head must be re-read");
        assert!(s.ready.is_empty());
    }
}
