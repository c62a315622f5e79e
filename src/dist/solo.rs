//! One process, rank 0 of 1: every collective is the identity, so a single-process run goes
//! through the same code as a distributed one and computes exactly what it always did.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use super::owned::Owned;
use super::{check_gather, check_rank, Communicator, DistError, Result, Slice, SliceMut};

/// The group of one. Messages a rank sends to itself wait in a mailbox until received.
#[derive(Debug, Default)]
pub struct Solo {
    mailbox: Mutex<VecDeque<(u16, Owned)>>,
}

impl Communicator for Solo {
    fn rank(&self) -> usize {
        0
    }

    fn size(&self) -> usize {
        1
    }

    fn all_reduce_sum_slice(&self, buf: SliceMut<'_>) -> Result<()> {
        match buf {
            SliceMut::U8(_) => Err(DistError::Unsupported { op: "all_reduce_sum", dtype: "u8" }),
            _ => Ok(()),
        }
    }

    fn all_gather_slice(&self, send: Slice<'_>, counts: &[usize], mut recv: SliceMut<'_>) -> Result<()> {
        check_gather(0, 1, send.len(), counts, recv.len())?;
        Owned::copy_of(&send).write_into(&mut recv, 0, "all_gather")
    }

    fn broadcast_slice(&self, _buf: SliceMut<'_>, root: usize) -> Result<()> {
        check_rank("broadcast", root, 1)
    }

    fn barrier(&self) -> Result<()> {
        Ok(())
    }

    fn send_slice(&self, buf: Slice<'_>, dest: usize, tag: u16) -> Result<()> {
        check_rank("send", dest, 1)?;
        self.mailbox
            .lock()
            .map_err(|_| DistError::PeerFailed { op: "send", rank: 0 })?
            .push_back((tag, Owned::copy_of(&buf)));
        Ok(())
    }

    fn probe(&self, source: usize, tag: u16) -> Result<bool> {
        check_rank("probe", source, 1)?;
        let mailbox = self.mailbox.lock().map_err(|_| DistError::PeerFailed { op: "probe", rank: 0 })?;
        Ok(mailbox.iter().any(|(t, _)| *t == tag))
    }

    fn recv_slice(&self, mut buf: SliceMut<'_>, source: usize, tag: u16) -> Result<()> {
        check_rank("recv", source, 1)?;
        let mut mailbox = self.mailbox.lock().map_err(|_| DistError::PeerFailed { op: "recv", rank: 0 })?;
        // A receive nothing was sent for would wait forever: with one rank, that is an error now.
        let at = mailbox.iter().position(|(t, _)| *t == tag).ok_or_else(|| DistError::Shape {
            op: "recv",
            detail: format!("nothing was sent with tag {tag} (one rank: a receive would wait forever)"),
        })?;
        let (_, msg) = mailbox.remove(at).ok_or(DistError::PeerFailed { op: "recv", rank: 0 })?;
        if msg.len() != buf.len() {
            return Err(DistError::Shape {
                op: "recv",
                detail: format!("a message of {} elements into a buffer of {}", msg.len(), buf.len()),
            });
        }
        msg.write_into(&mut buf, 0, "recv")
    }

    fn duplicate(&self) -> Result<Arc<dyn Communicator>> {
        Ok(Arc::new(Solo::default()))
    }

    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}
