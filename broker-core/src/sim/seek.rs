//! Seeks as `seek.rs` runs them: the position found first (checked: the events it will
//! replay are those received at or after its time), then clearing and queueing steps taken one
//! at a time between other operations, then the end that lets the subscription go; a crash
//! abandons a seek (the engine ends it at the next open).

use crate::clock::Timestamp;
use crate::error::Result;
use crate::ids::RoomName;
use crate::storage::WriteOutput;

use super::acts::{ok, unexpected};
use super::model::Sub;
use super::run::Sim;
use super::world::{SeekPhase, SeekProc};
use super::{room_name, CHECK_SEEK_BY_TIME_AFTER_STEP_BACK};

impl Sim {
    /// A seek begins: its position is found (checked against the model), its steps follow.
    pub(super) fn seek_start(&mut self, s: Sub, target: Option<Timestamp>) -> Result<(), String> {
        let room = self.model.subs[s].room;
        let name = RoomName::new(room_name(room)).map_err(|e| e.to_string())?;
        let (from, end) = self
            .engine()
            .seek_offsets(&name, target)
            .map_err(|e| e.to_string())?;
        let events: Vec<_> = self.model.room_events(room).map(|(_, e)| e).collect();
        if events.iter().any(|e| e.pos >= end) || from > end {
            return Err(format!(
                "r{room} seek positions ({from}, {end}) do not cover its log"
            ));
        }
        // The events the seek will queue again must be those received at or after its time
        // (all, to the oldest). Positions of events retention removed may fall either side.
        let replayed: Vec<u64> = events
            .iter()
            .filter(|e| e.pos >= from)
            .map(|e| e.pos)
            .collect();
        let want: Vec<u64> = events
            .iter()
            .filter(|e| target.is_none_or(|t| e.at >= t))
            .map(|e| e.pos)
            .collect();
        let monotonic = events.windows(2).all(|w| w[0].at <= w[1].at);
        if replayed != want && (monotonic || CHECK_SEEK_BY_TIME_AFTER_STEP_BACK) {
            return Err(format!(
                "r{room} seek to {target:?} starts at position {from}, replaying {replayed:?}; \
                 received then or later: {want:?}"
            ));
        }
        self.note(format!("    seek of s{s} from {from} to {end}"));
        self.world.seeks.insert(
            s,
            SeekProc {
                from,
                end,
                phase: SeekPhase::Clear,
            },
        );
        Ok(())
    }

    /// A committed seek step: its count and next position must be the model's.
    pub(super) fn seek_result(
        &mut self,
        sub: Sub,
        phase: SeekPhase,
        limit: usize,
        result: Result<WriteOutput>,
    ) -> std::result::Result<(), String> {
        let now = self.world.now;
        let out = ok(result, "seek step")?;
        let Some(mut proc_) = self.world.seeks.get(&sub).copied() else {
            return Err(format!("s{sub} has no seek under way"));
        };
        match (phase, out) {
            (SeekPhase::Clear, WriteOutput::Count { n, more }) => {
                let want = self.model.seek_clear(sub, proc_.end, limit);
                if (n, more) != want {
                    return Err(format!(
                        "s{sub} seek clear: engine (n, more) {:?}, model {want:?}",
                        (n, more)
                    ));
                }
                if !more {
                    proc_.phase = SeekPhase::Enqueue(proc_.from);
                }
            }
            (SeekPhase::Enqueue(from), WriteOutput::Seeked { n, next }) => {
                let want = self.model.seek_enqueue(sub, from, proc_.end, limit, now);
                if (n, next) != want {
                    return Err(format!(
                        "s{sub} seek enqueue: engine (n, next) {:?}, model {want:?}",
                        (n, next)
                    ));
                }
                proc_.phase = next.map_or(SeekPhase::Done, SeekPhase::Enqueue);
            }
            (SeekPhase::Done, WriteOutput::Subscription(..)) => {
                self.model.seek_done(sub);
                self.world.seeks.remove(&sub);
                self.count("seeks completed", 1);
                return Ok(());
            }
            (_, out) => return unexpected("seek step", out),
        }
        self.world.seeks.insert(sub, proc_);
        Ok(())
    }
}
