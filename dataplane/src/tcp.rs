//! TCP window tracking: which segments of a session are plausible, and what
//! they change. A pure function of the session's two [`Side`]s, its state
//! and one [`Segment`]; the table stores the sides (atomically, see
//! `session::TcpTrack`) and the core applies the [`Outcome`].
//!
//! The checks are those of Linux's `tcp_in_window`: a segment is accepted
//! when it starts no later than the highest sequence number the receiver
//! allowed (`maxend`), ends no earlier than one receive window before what
//! the sender already sent, and acknowledges nothing the receiver has not
//! sent and no more than one window behind it. A RST closes the session
//! only when its sequence number is exactly the receiver's next expected
//! one (RFC 5961 §3): an in-window RST that is not exact is answered with a
//! challenge ACK (a true peer then resets with the exact number), one out
//! of the window is dropped. A SYN inside a synchronized session changes
//! nothing and reaches the endpoint, whose own RFC 5961 §4 challenge ACK
//! lets a restarted client reset the old connection.
//!
//! **Pickup.** A session whose handshake this node did not see — a synced
//! copy after a failover, or a session this node tracked before it lost
//! and regained the RG (its windows are then stale) — starts with both
//! sides unknown and is tracked liberally: every segment is accepted and
//! teaches the side that sent it. Window scaling is negotiated in the
//! handshake only, so a picked-up session never learns the scale; once
//! both sides have been seen its windows are checked with the largest
//! scale (14) assumed, which keeps the ack checks exact and bounds the
//! sequence checks by 2^30 bytes. RSTs are checked exactly from the first
//! packet seen in the other direction on. The window state is relearned,
//! never synced (no protocol change): see docs/PROTOCOL.md.

use crate::session::{Direction, TcpState};

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const ACK: u8 = 0x10;

/// The largest window scale RFC 7323 allows: assumed when it is unknown.
pub const MAX_SCALE: u8 = 14;

/// What tracking needs of one TCP segment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub seq: u32,
    pub ack: u32,
    pub win: u16,
    pub flags: u8,
    /// Payload bytes (SYN and FIN not counted).
    pub len: u32,
    /// Window scale option (SYN and SYN-ACK only).
    pub wscale: Option<u8>,
}

impl Segment {
    /// The segment of the TCP header at `l4`, its payload ending at `end`.
    /// `None` when the header is truncated or its data offset is invalid.
    pub fn parse(f: &[u8], l4: usize, end: usize) -> Option<Segment> {
        let h = f.get(l4..l4 + 20)?;
        let doff = usize::from(h[12] >> 4) * 4;
        if doff < 20 || l4 + doff > end {
            return None;
        }
        let flags = h[13];
        let mut s = Segment {
            seq: u32::from_be_bytes(h[4..8].try_into().ok()?),
            ack: u32::from_be_bytes(h[8..12].try_into().ok()?),
            win: u16::from_be_bytes([h[14], h[15]]),
            flags,
            len: (end - l4 - doff) as u32,
            wscale: None,
        };
        if flags & SYN != 0 {
            for (kind, data) in Options::new(&f[l4 + 20..l4 + doff]) {
                if kind == 3 && data.len() == 1 {
                    s.wscale = Some(data[0].min(MAX_SCALE));
                }
            }
        }
        Some(s)
    }

    fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    /// Sequence space the segment occupies past `seq`.
    fn end(&self) -> u32 {
        self.seq
            .wrapping_add(self.len)
            .wrapping_add(u32::from(self.has(SYN)))
            .wrapping_add(u32::from(self.has(FIN)))
    }
}

/// TCP options as (kind, data), ending at EOL or at the first malformed
/// option.
pub struct Options<'a> {
    rest: &'a [u8],
}

impl<'a> Options<'a> {
    pub fn new(opts: &'a [u8]) -> Options<'a> {
        Options { rest: opts }
    }
}

impl<'a> Iterator for Options<'a> {
    type Item = (u8, &'a [u8]);

    fn next(&mut self) -> Option<(u8, &'a [u8])> {
        loop {
            let (&kind, tail) = self.rest.split_first()?;
            match kind {
                0 => {
                    self.rest = &[];
                    return None;
                }
                1 => self.rest = tail,
                _ => {
                    let len = usize::from(*tail.first()?);
                    if len < 2 || len > self.rest.len() {
                        self.rest = &[];
                        return None;
                    }
                    let data = &self.rest[2..len];
                    self.rest = &self.rest[len..];
                    return Some((kind, data));
                }
            }
        }
    }
}

/// The side has sent a segment since tracking (re)started.
pub const SEEN: u8 = 1;
/// The side offered window scaling in its SYN.
pub const WSCALE: u8 = 2;
/// The handshake was seen: windows and scale are known exactly.
pub const HANDSHAKE: u8 = 4;
/// `ack` holds an acknowledgment the side sent.
pub const ACKED: u8 = 8;

/// What is known of one direction's sender.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Side {
    /// Highest sequence number sent, plus one (its SND.NXT).
    pub end: u32,
    /// Highest sequence number it may send: the other side's ack plus
    /// window.
    pub maxend: u32,
    /// Largest window it advertised, scaled.
    pub maxwin: u32,
    /// Last acknowledgment it sent (its RCV.NXT).
    pub ack: u32,
    /// Last window it advertised, as on the wire.
    pub win: u16,
    pub scale: u8,
    pub flags: u8,
}

impl Side {
    fn is(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    /// A side that just sent SYN (or SYN-ACK) `s`.
    fn from_syn(s: &Segment) -> Side {
        let end = s.end();
        Side {
            end,
            maxend: end,
            // Windows in SYNs are never scaled (RFC 7323 §2.2).
            maxwin: u32::from(s.win).max(1),
            ack: s.ack,
            win: s.win,
            scale: s.wscale.unwrap_or(0),
            flags: SEEN
                | if s.wscale.is_some() { WSCALE } else { 0 }
                | if s.has(ACK) { ACKED } else { 0 },
        }
    }

    /// The shift applied to this side's advertised windows.
    fn shift(&self) -> u8 {
        if self.is(HANDSHAKE) {
            self.scale
        } else {
            MAX_SCALE
        }
    }
}

/// Both directions: `[forward, reverse]`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Windows {
    pub sides: [Side; 2],
}

/// Why a segment was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Invalid {
    /// Data or ACK outside the window.
    OutOfWindow,
    /// A RST outside the receiver's window.
    RstOutOfWindow,
    /// A flag combination no endpoint sends in a session (SYN with RST or
    /// FIN, or no SYN, ACK or RST at all).
    BadFlags,
    /// A SYN-ACK that does not acknowledge the SYN.
    SynAckMismatch,
}

/// What to do with a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Forward it; the session moves to this state (maybe the same one).
    Accept(TcpState),
    /// Forward it, changing nothing: the endpoint judges it.
    Pass,
    /// Drop it and answer its sender with a challenge ACK (the
    /// receiver's SND.NXT, RCV.NXT and window, see [`Challenge`]).
    Challenge(Challenge),
    /// Drop and count it.
    Invalid(Invalid),
}

/// The ACK RFC 5961 answers an inexact RST with, as the receiver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Challenge {
    pub seq: u32,
    pub ack: u32,
    pub win: u16,
}

fn idx(d: Direction) -> (usize, usize) {
    match d {
        Direction::Forward => (0, 1),
        Direction::Reverse => (1, 0),
    }
}

/// `a` is before `b` in sequence space.
fn before(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

fn after(a: u32, b: u32) -> bool {
    before(b, a)
}

/// Judges `seg` sent in direction `dir` of a session in `state`, and
/// updates `w` when the segment is accepted (only then).
pub fn track(w: &mut Windows, state: TcpState, dir: Direction, seg: &Segment) -> Outcome {
    use TcpState::*;
    let (s, r) = idx(dir);
    if (seg.has(SYN) && seg.has(RST) | seg.has(FIN)) || seg.flags & (SYN | ACK | RST) == 0 {
        return Outcome::Invalid(Invalid::BadFlags);
    }
    if seg.has(SYN) && !seg.has(ACK) {
        return match (dir, state) {
            // The opening SYN (a retransmission re-learns it), or a new
            // connection on the 4-tuple of one that closed.
            (Direction::Forward, None | SynSent | TimeWait | Closed) => {
                w.sides = [Side::from_syn(seg), Side::default()];
                Outcome::Accept(SynSent)
            }
            _ => Outcome::Pass,
        };
    }
    if seg.has(SYN) {
        // SYN-ACK.
        if dir == Direction::Reverse && matches!(state, SynSent | SynReceived) {
            let fwd = w.sides[0];
            if fwd.is(SEEN) && seg.ack != fwd.end {
                return Outcome::Invalid(Invalid::SynAckMismatch);
            }
            let mut rev = Side::from_syn(seg);
            let mut fwd = fwd;
            if !(fwd.is(WSCALE) && rev.is(WSCALE)) {
                fwd.scale = 0;
                rev.scale = 0;
            }
            fwd.maxend = seg.ack.wrapping_add(u32::from(seg.win));
            fwd.flags |= HANDSHAKE;
            rev.flags |= HANDSHAKE;
            w.sides = [fwd, rev];
            return Outcome::Accept(SynReceived);
        }
        return Outcome::Pass;
    }
    let was = w.sides;
    if seg.has(RST) {
        return judge_rst(&was, state, s, r, seg);
    }
    let (snd, rcv) = (was[s], was[r]);
    let end = seg.end();
    let ack = if seg.has(ACK) { seg.ack } else { rcv.end };
    let win = u32::from(seg.win) << snd.shift();
    // Checked only once both sides are known; a picked-up session is
    // accepted as it comes until then.
    if snd.is(SEEN) && rcv.is(SEEN) {
        let ack_win = snd.maxwin.max(66_000);
        let ok = !after(seg.seq, snd.maxend)
            && after(end, snd.end.wrapping_sub(rcv.maxwin).wrapping_sub(1))
            && (!seg.has(ACK)
                || (!after(ack, rcv.end)
                    && after(ack, rcv.end.wrapping_sub(ack_win).wrapping_sub(1))));
        if !ok {
            return Outcome::Invalid(Invalid::OutOfWindow);
        }
    }
    let mut snd = snd;
    let mut rcv = rcv;
    if !snd.is(SEEN) {
        snd.end = end;
        snd.maxend = end;
        snd.maxwin = win.max(1);
        snd.flags |= SEEN;
    }
    if after(end, snd.end) {
        snd.end = end;
    }
    snd.maxwin = snd.maxwin.max(win);
    snd.win = seg.win;
    if seg.has(ACK) {
        snd.ack = ack;
        snd.flags |= ACKED;
        let allowed = ack.wrapping_add(win);
        if !rcv.is(SEEN) {
            // The receiver's next sequence number is what this side acks.
            rcv.end = ack;
            rcv.maxend = allowed;
        } else if after(allowed, rcv.maxend) {
            rcv.maxend = allowed;
        }
    }
    // Data the receiver sends may reach as far as this side's window
    // after what it acked; a sender's own bound grows with the acks it
    // receives (above, as the receiver of the other direction).
    if !snd.is(HANDSHAKE) && after(snd.end, snd.maxend) {
        snd.maxend = snd.end;
    }
    w.sides[s] = snd;
    w.sides[r] = rcv;
    Outcome::Accept(crate::core::next_tcp_state(state, dir, seg.flags))
}

fn judge_rst(w: &[Side; 2], state: TcpState, s: usize, r: usize, seg: &Segment) -> Outcome {
    let (snd, rcv) = (w[s], w[r]);
    // RFC 5961 §3.2: exactly the receiver's RCV.NXT. The sender's own
    // SND.NXT is exact too: a reset sent while its last data is in flight.
    let exact = (rcv.is(ACKED) && seg.seq == rcv.ack) || (snd.is(SEEN) && seg.seq == snd.end);
    if exact || state == TcpState::SynSent {
        // In SYN-SENT a RST answers the SYN: it is acceptable when it
        // acknowledges it (RFC 793), which the SYN-ACK check covers for
        // the other direction; a refused connection closes.
        if state == TcpState::SynSent && !exact && !(seg.has(ACK) && seg.ack == w[0].end) {
            return Outcome::Invalid(Invalid::RstOutOfWindow);
        }
        return Outcome::Accept(TcpState::Closed);
    }
    if !rcv.is(ACKED) {
        // Nothing known of what the receiver expects (picked up from one
        // side only): the endpoint judges; the session stays.
        return Outcome::Pass;
    }
    let window_end = if rcv.is(SEEN) && snd.is(SEEN) && snd.is(HANDSHAKE) {
        snd.maxend
    } else {
        rcv.ack.wrapping_add(u32::from(rcv.win) << MAX_SCALE)
    };
    if !before(seg.seq, rcv.ack) && !after(seg.seq, window_end) {
        return Outcome::Challenge(Challenge {
            seq: rcv.end,
            ack: rcv.ack,
            win: rcv.win,
        });
    }
    Outcome::Invalid(Invalid::RstOutOfWindow)
}

#[cfg(test)]
#[path = "tcp_tests.rs"]
mod tests;
