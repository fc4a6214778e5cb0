//! The write queue: relay writes waiting to be handed to storage, in an order storage accepts.
//!
//! Storage refuses an append whose `after` is not its stored count, so two writes of one CoValue
//! must reach it in the order the relay issued them. Spawning one task per write would let the
//! runtime reorder them. Instead, at most one batch per CoValue is in flight: everything issued
//! for a CoValue while its batch is in flight waits here and goes out, in order, in the next
//! batch. Writes of different CoValues never wait for each other, and everything ready at a
//! flush goes to storage in ONE call (one writer job, one commit), so a burst of writes costs one
//! fsync — the storage writer then groups these calls with other engines' writes too.

use std::collections::HashSet;

use crate::ids::CoId;
use crate::persistence::PersistRequest;

#[derive(Default)]
pub(crate) struct WriteQueue {
    /// Waiting writes in issue order.
    queued: Vec<PersistRequest>,
    /// CoValues with a batch in storage.
    in_flight: HashSet<CoId>,
}

impl WriteQueue {
    pub(crate) fn push(&mut self, req: PersistRequest) {
        self.queued.push(req);
    }

    /// Takes every waiting write whose CoValue has nothing in flight (keeping issue order) and
    /// marks those CoValues in flight.
    pub(crate) fn take_ready(&mut self) -> Vec<PersistRequest> {
        if self.queued.is_empty() {
            return Vec::new();
        }
        let (ready, waiting): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.queued).into_iter().partition(|r| !self.in_flight.contains(&r.id));
        self.queued = waiting;
        self.in_flight.extend(ready.iter().map(|r| r.id.clone()));
        ready
    }

    /// A batch came back: its CoValues may write again.
    pub(crate) fn finished<'a>(&mut self, ids: impl IntoIterator<Item = &'a CoId>) {
        for id in ids {
            self.in_flight.remove(id);
        }
    }

    /// Drops the waiting writes of `id` after one of its writes failed: the relay has abandoned
    /// them (it reloads the CoValue from storage), and storage would refuse them anyway.
    pub(crate) fn discard(&mut self, id: &CoId) -> usize {
        let before = self.queued.len();
        self.queued.retain(|r| &r.id != id);
        before - self.queued.len()
    }

    /// Writes waiting or in flight (CoValues in flight count once).
    pub(crate) fn pending(&self) -> usize {
        self.queued.len() + self.in_flight.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persistence::PersistToken;

    fn req(token: u64, id: &str) -> PersistRequest {
        PersistRequest {
            token: PersistToken(token),
            id: CoId::parse(id).unwrap(),
            header: None,
            sessions: Vec::new(),
            deleted: false,
            erase: vec![],
        }
    }

    fn tokens(reqs: &[PersistRequest]) -> Vec<u64> {
        reqs.iter().map(|r| r.token.0).collect()
    }

    #[test]
    fn one_batch_per_covalue_in_flight_and_order_kept() {
        let mut q = WriteQueue::default();
        q.push(req(1, "co_zA"));
        q.push(req(2, "co_zB"));
        q.push(req(3, "co_zA"));
        assert_eq!(tokens(&q.take_ready()), vec![1, 2, 3], "nothing in flight: all in one batch, in order");
        q.push(req(4, "co_zA"));
        q.push(req(5, "co_zC"));
        q.push(req(6, "co_zA"));
        assert_eq!(tokens(&q.take_ready()), vec![5], "A waits for its batch");
        q.finished([&CoId::parse("co_zA").unwrap(), &CoId::parse("co_zB").unwrap()]);
        assert_eq!(tokens(&q.take_ready()), vec![4, 6]);
        q.push(req(7, "co_zA"));
        q.push(req(8, "co_zC"));
        assert_eq!(q.discard(&CoId::parse("co_zA").unwrap()), 1);
        assert_eq!(q.pending(), 3, "8 waiting + A and C in flight");
    }
}
