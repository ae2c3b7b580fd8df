//! A service's demand as the autoscaler sees it: requests in flight plus requests queued,
//! counted from the moment a request asks for a slot until its lease ends (or it is refused).
//!
//! The autoscaler is told the instant demand goes above the watermark it set (the demand its
//! current and starting instances take at their target), once per crossing: the signal is an
//! event on the pool's channel, not a poll. For scale-in it reads the peak since its last look.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Lock-free counters shared by a pool's requests.
#[derive(Debug)]
pub struct DemandMeter {
    current: AtomicUsize,
    peak: AtomicUsize,
    watermark: AtomicUsize,
    /// Set when a crossing was signalled, cleared when demand goes back to the watermark.
    signalled: AtomicBool,
}

impl Default for DemandMeter {
    fn default() -> Self {
        DemandMeter {
            current: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            // No autoscaler yet: never signal.
            watermark: AtomicUsize::new(usize::MAX),
            signalled: AtomicBool::new(false),
        }
    }
}

impl DemandMeter {
    /// A request arrived. Returns the demand to signal if this arrival crossed the watermark.
    pub(crate) fn arrive(&self) -> Option<usize> {
        let now = self.current.fetch_add(1, Ordering::AcqRel) + 1;
        self.peak.fetch_max(now, Ordering::AcqRel);
        self.crossed(now)
    }

    /// A request's lease ended, or it was refused.
    pub(crate) fn leave(&self) {
        let now = self
            .current
            .fetch_sub(1, Ordering::AcqRel)
            .saturating_sub(1);
        if now <= self.watermark.load(Ordering::Acquire) {
            self.signalled.store(false, Ordering::Release);
        }
    }

    fn crossed(&self, demand: usize) -> Option<usize> {
        (demand > self.watermark.load(Ordering::Acquire)
            && !self.signalled.swap(true, Ordering::AcqRel))
        .then_some(demand)
    }

    /// Requests in flight plus queued now.
    pub fn current(&self) -> usize {
        self.current.load(Ordering::Acquire)
    }

    /// The highest demand since the last call (or since the pool was made), then starts a new
    /// period at the current demand.
    pub fn take_peak(&self) -> usize {
        let current = self.current();
        self.peak.swap(current, Ordering::AcqRel).max(current)
    }

    /// Sets the demand above which arrivals signal. Returns the demand to signal if it is
    /// already above (new instances failed, or demand grew while they started).
    pub fn set_watermark(&self, watermark: usize) -> Option<usize> {
        self.watermark.store(watermark, Ordering::Release);
        self.signalled.store(false, Ordering::Release);
        self.crossed(self.current())
    }
}

#[cfg(all(test, not(lull_loom)))]
mod tests {
    use super::*;

    #[test]
    fn signals_once_per_crossing() {
        let m = DemandMeter::default();
        assert_eq!(m.arrive(), None, "no watermark: never");
        m.leave();
        assert_eq!(m.set_watermark(2), None);
        assert_eq!(m.arrive(), None);
        assert_eq!(m.arrive(), None);
        assert_eq!(m.arrive(), Some(3));
        assert_eq!(m.arrive(), None, "one signal per crossing");
        m.leave();
        m.leave();
        assert_eq!(m.current(), 2);
        assert_eq!(m.arrive(), Some(3), "back at the watermark re-arms");
        assert_eq!(m.take_peak(), 4);
        assert_eq!(
            m.take_peak(),
            3,
            "the new period starts at the current demand"
        );
    }

    #[test]
    fn a_lower_watermark_signals_at_once() {
        let m = DemandMeter::default();
        m.arrive();
        m.arrive();
        assert_eq!(m.set_watermark(1), Some(2));
        assert_eq!(m.set_watermark(5), None);
        // Zero instances: the first request signals.
        let m = DemandMeter::default();
        m.set_watermark(0);
        assert_eq!(m.arrive(), Some(1));
    }
}
