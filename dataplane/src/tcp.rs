//! TCP window tracking: which segments of a session are plausible, and what
//! they change. A pure function of the session's two [`Side`]s, its state
//! and one [`Segment`]; the table stores the sides (atomically, see
//! `session::TcpTrack`) and the core applies the [`Outcome`].
//!
//! The checks are those of Linux's `tcp_in_window`: a segment is accepted
//! when it starts no later than the highest sequence number the receiver
//! allowed (`maxend`), ends no earlier than one receive window before what
//! the sender already sent, and acknowledges nothing the receiver has not
//! sent and no more than one window behind it. (`maxend` is not stored:
//! it is the receiver's latest acknowledgment plus the window sent with
//! it, which keeps a session's windows in 32 bytes.) A RST closes the session
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
//! scale (14) assumed, which bounds the sequence and ack checks by 2^30
//! bytes rather than by the true windows. RSTs are checked exactly from the first
//! packet seen in the other direction on. The window state is relearned,
//! never synced (no protocol change): see docs/PROTOCOL.md.

use crate::packet::{self, Family, Ip, Mac};
use crate::session::{Direction, TcpState};

pub use crate::packet::{TCP_ACK as ACK, TCP_FIN as FIN, TCP_RST as RST, TCP_SYN as SYN};

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
            let opts = &f[l4 + 20..l4 + doff];
            for (kind, data) in Options::new(opts) {
                if kind == 3 && data.len() == 1 {
                    s.wscale = Some(opts[data.start].min(MAX_SCALE));
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

/// TCP options as (kind, data range within the option bytes), ending at
/// EOL or at the first malformed option. Ranges, not slices, so the MSS
/// clamp can rewrite what it finds.
pub struct Options<'a> {
    opts: &'a [u8],
    at: usize,
}

impl<'a> Options<'a> {
    pub fn new(opts: &'a [u8]) -> Options<'a> {
        Options { opts, at: 0 }
    }
}

impl Iterator for Options<'_> {
    type Item = (u8, std::ops::Range<usize>);

    fn next(&mut self) -> Option<(u8, std::ops::Range<usize>)> {
        loop {
            let kind = *self.opts.get(self.at)?;
            match kind {
                0 => {
                    self.at = self.opts.len();
                    return None;
                }
                1 => self.at += 1,
                _ => {
                    let len = usize::from(*self.opts.get(self.at + 1)?);
                    if len < 2 || self.at + len > self.opts.len() {
                        self.at = self.opts.len();
                        return None;
                    }
                    let data = self.at + 2..self.at + len;
                    self.at += len;
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
    /// Highest acknowledgment it sent (its RCV.NXT).
    pub ack: u32,
    /// The window it advertised with that acknowledgment, as on the wire.
    pub win: u16,
    /// Largest window it advertised, as on the wire.
    pub maxwin: u16,
    pub scale: u8,
    pub flags: u8,
}

impl Side {
    fn is(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    /// A side that just sent SYN (or SYN-ACK) `s`.
    fn from_syn(s: &Segment) -> Side {
        Side {
            end: s.end(),
            ack: s.ack,
            win: s.win,
            maxwin: s.win.max(1),
            scale: s.wscale.unwrap_or(0),
            flags: SEEN
                | if s.wscale.is_some() { WSCALE } else { 0 }
                | if s.has(ACK) { ACKED } else { 0 },
        }
    }

    /// The shift applied to this side's advertised windows: the scale
    /// negotiated, or the largest one when the handshake was not seen.
    /// (SYN windows are unscaled, so right after the handshake this is
    /// lenient by the scale factor, never strict.)
    fn shift(&self) -> u8 {
        if self.is(HANDSHAKE) {
            self.scale
        } else {
            MAX_SCALE
        }
    }

    /// The highest sequence number the other side may send: this side's
    /// acknowledgment plus its window.
    pub fn allowed(&self) -> u32 {
        self.ack.wrapping_add(u32::from(self.win) << self.shift())
    }

    fn maxwin_scaled(&self) -> u32 {
        u32::from(self.maxwin) << self.shift()
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
            fwd.flags |= HANDSHAKE;
            rev.flags |= HANDSHAKE;
            w.sides = [fwd, rev];
            return Outcome::Accept(SynReceived);
        }
        return Outcome::Pass;
    }
    let syn_end = w.sides[0].end;
    let [fwd, rev] = &mut w.sides;
    let (snd, rcv) = match dir {
        Direction::Forward => (fwd, rev),
        Direction::Reverse => (rev, fwd),
    };
    if seg.has(RST) {
        return judge_rst(snd, rcv, state, syn_end, seg);
    }
    let end = seg.end();
    let ack = if seg.has(ACK) { seg.ack } else { rcv.end };
    // Checked only once both sides are known; a picked-up session is
    // accepted as it comes until then. Nothing changes before the checks.
    if snd.is(SEEN) && rcv.is(SEEN) && rcv.is(ACKED) {
        let ack_win = snd.maxwin_scaled().max(66_000);
        let ok = !after(seg.seq, rcv.allowed())
            && after(
                end,
                snd.end.wrapping_sub(rcv.maxwin_scaled()).wrapping_sub(1),
            )
            && (!seg.has(ACK)
                || ((!after(ack, rcv.end) || !rcv.is(HANDSHAKE))
                    && after(ack, rcv.end.wrapping_sub(ack_win).wrapping_sub(1))));
        if !ok {
            return Outcome::Invalid(Invalid::OutOfWindow);
        }
    }
    if !snd.is(SEEN) {
        snd.end = end;
        snd.flags |= SEEN;
    }
    if after(end, snd.end) {
        snd.end = end;
    }
    snd.maxwin = snd.maxwin.max(seg.win);
    if seg.has(ACK) {
        // A reordered older acknowledgment teaches nothing; the window
        // goes with the acknowledgment it was sent with.
        if !snd.is(ACKED) || !before(ack, snd.ack) {
            snd.ack = ack;
            snd.win = seg.win;
        }
        snd.flags |= ACKED;
        if !rcv.is(SEEN) || (!rcv.is(HANDSHAKE) && after(ack, rcv.end)) {
            // The receiver's next sequence number is at least what this
            // side acks (in a picked-up session the receiver may have sent
            // more before this node saw it).
            rcv.end = ack;
        }
    }
    Outcome::Accept(next_tcp_state(state, dir, seg.flags))
}

/// The state a segment the tracker accepted moves the session to (a RST
/// reaches here only when it was exact).
pub fn next_tcp_state(s: TcpState, dir: Direction, flags: u8) -> TcpState {
    use TcpState::*;
    if flags & RST != 0 {
        return Closed;
    }
    if flags & FIN != 0 {
        return match s {
            FinWait if dir == Direction::Reverse => TimeWait,
            CloseWait if dir == Direction::Forward => TimeWait,
            Established | SynReceived => {
                if dir == Direction::Forward {
                    FinWait
                } else {
                    CloseWait
                }
            }
            other => other,
        };
    }
    match (s, dir) {
        (SynSent, Direction::Reverse) if flags & SYN != 0 && flags & ACK != 0 => SynReceived,
        (SynReceived, Direction::Forward) if flags & ACK != 0 => Established,
        (other, _) => other,
    }
}

/// `syn_end`: the forward side's end (the SYN's, in SYN-SENT).
fn judge_rst(snd: &Side, rcv: &Side, state: TcpState, syn_end: u32, seg: &Segment) -> Outcome {
    // RFC 5961 §3.2: exactly the receiver's RCV.NXT. The sender's own
    // SND.NXT is exact too: a reset sent while its last data is in flight.
    let exact = (rcv.is(ACKED) && seg.seq == rcv.ack) || (snd.is(SEEN) && seg.seq == snd.end);
    // In SYN-SENT a RST answers the SYN: acceptable when it acknowledges
    // it (RFC 793); a refused connection closes.
    let refuses_syn = state == TcpState::SynSent && seg.has(ACK) && seg.ack == syn_end;
    if exact || refuses_syn {
        return Outcome::Accept(TcpState::Closed);
    }
    if state == TcpState::SynSent {
        return Outcome::Invalid(Invalid::RstOutOfWindow);
    }
    if !rcv.is(ACKED) {
        // Nothing known of what the receiver expects (picked up from one
        // side only): the endpoint judges; the session stays.
        return Outcome::Pass;
    }
    if !before(seg.seq, rcv.ack) && !after(seg.seq, rcv.allowed()) {
        return Outcome::Challenge(Challenge {
            seq: rcv.end,
            ack: rcv.ack,
            win: rcv.win,
        });
    }
    Outcome::Invalid(Invalid::RstOutOfWindow)
}

/// Lowers the MSS option of the SYN at `l4` (segment ending at `end`) to
/// `mss`, keeping the checksum; whether it changed anything. A SYN without
/// the option is left alone (its peer assumes 536 / 1220).
pub fn clamp_mss(f: &mut [u8], l4: usize, end: usize, mss: u16) -> bool {
    let Some(doff) = f.get(l4 + 12).map(|b| usize::from(b >> 4) * 4) else {
        return false;
    };
    if doff < 20 || l4 + doff > end {
        return false;
    }
    let opts = l4 + 20;
    let Some(data) = Options::new(&f[opts..l4 + doff])
        .find(|(kind, data)| *kind == 2 && data.len() == 2)
        .map(|(_, data)| opts + data.start)
    else {
        return false;
    };
    let old = u16::from_be_bytes([f[data], f[data + 1]]);
    if old <= mss {
        return false;
    }
    f[data..data + 2].copy_from_slice(&mss.to_be_bytes());
    let c = u16::from_be_bytes([f[l4 + 16], f[l4 + 17]]);
    let c = packet::csum_replace16(c, old, mss);
    f[l4 + 16..l4 + 18].copy_from_slice(&c.to_be_bytes());
    true
}

/// A bare segment the firewall itself sends (a challenge ACK, a SYN
/// cookie's SYN-ACK, the SYN proxy's SYN and ACK): 20 bytes of header, or
/// 24 with an MSS option.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bare {
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub win: u16,
    pub mss: Option<u16>,
}

/// Rewrites the segment in `f` into `b` sent back to its sender:
/// addresses, ports and MACs swapped (`smac` ours), TTL/hop limit 64, no
/// IP options or extension headers; the frame's new length. `None` if the
/// frame is too short for it.
pub fn build_reply(f: &mut [u8], ip: &Ip, smac: Mac, b: &Bare) -> Option<usize> {
    let (sport, dport) = (
        packet::be16(f, ip.l4).ok()?,
        packet::be16(f, ip.l4 + 2).ok()?,
    );
    let dmac = packet::mac_at(f, 6).ok()?;
    let end = write_bare(f, ip, (ip.dst, dport), (ip.src, sport), b)?;
    packet::set_macs(f, dmac, smac);
    Some(end)
}

/// Rewrites the segment in `f` into `b` in its own direction (same
/// addresses and ports, link layer untouched); the frame's new length.
/// `None` if `f` is too short (the caller sizes a copy for 24 bytes of
/// header).
pub fn build_onward(f: &mut [u8], ip: &Ip, b: &Bare) -> Option<usize> {
    let (sport, dport) = (
        packet::be16(f, ip.l4).ok()?,
        packet::be16(f, ip.l4 + 2).ok()?,
    );
    write_bare(f, ip, (ip.src, sport), (ip.dst, dport), b)
}

/// Writes an IP header (`src` to `dst`) and bare TCP segment `b` at
/// `ip.l3`; where the frame ends.
fn write_bare(
    f: &mut [u8],
    ip: &Ip,
    (src, sport): ([u8; 16], u16),
    (dst, dport): ([u8; 16], u16),
    b: &Bare,
) -> Option<usize> {
    let l4 = ip.l3 + if ip.family == Family::V4 { 20 } else { 40 };
    let hlen = if b.mss.is_some() { 24 } else { 20 };
    let end = l4 + hlen;
    if f.len() < end {
        return None;
    }
    let seg = Ip {
        family: ip.family,
        l3: ip.l3,
        l4,
        end,
        proto: 6,
        ttl: 64,
        src,
        dst,
        frag: None,
    };
    match ip.family {
        Family::V4 => {
            let h = &mut f[ip.l3..l4];
            h.copy_from_slice(&[
                0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            ]);
            h[2..4].copy_from_slice(&((20 + hlen) as u16).to_be_bytes());
            h[12..16].copy_from_slice(&src[12..]);
            h[16..20].copy_from_slice(&dst[12..]);
            packet::ipv4_header_checksum(f, ip.l3, 20);
        }
        Family::V6 => {
            let h = &mut f[ip.l3..l4];
            h[..8].copy_from_slice(&[0x60, 0, 0, 0, 0, hlen as u8, 6, 64]);
            h[8..24].copy_from_slice(&src);
            h[24..40].copy_from_slice(&dst);
        }
    }
    let t = &mut f[l4..end];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&b.seq.to_be_bytes());
    t[8..12].copy_from_slice(&b.ack.to_be_bytes());
    t[12..20].copy_from_slice(&[((hlen / 4) as u8) << 4, b.flags, 0, 0, 0, 0, 0, 0]);
    t[14..16].copy_from_slice(&b.win.to_be_bytes());
    if let Some(mss) = b.mss {
        t[20..22].copy_from_slice(&[2, 4]);
        t[22..24].copy_from_slice(&mss.to_be_bytes());
    }
    let sum = packet::l4_checksum(f, &seg, l4 + 16);
    packet::put16(f, l4 + 16, sum);
    Some(end)
}

/// Rewrites the RST in `f` into challenge ACK `c` to its sender (see
/// [`build_reply`]); the frame's new length.
pub fn build_challenge_ack(f: &mut [u8], ip: &Ip, smac: Mac, c: Challenge) -> Option<usize> {
    let b = Bare {
        seq: c.seq,
        ack: c.ack,
        flags: ACK,
        win: c.win,
        mss: None,
    };
    build_reply(f, ip, smac, &b)
}

/// Adds `delta` to the 32-bit field at `at` (a sequence or acknowledgment
/// number) of the TCP segment at `l4`, keeping the checksum.
pub fn shift_u32(f: &mut [u8], l4: usize, at: usize, delta: u32) {
    let old: [u8; 4] = f[l4 + at..l4 + at + 4].try_into().expect("4 bytes");
    let new = u32::from_be_bytes(old).wrapping_add(delta).to_be_bytes();
    f[l4 + at..l4 + at + 4].copy_from_slice(&new);
    let c = u16::from_be_bytes([f[l4 + 16], f[l4 + 17]]);
    let c = packet::csum_replace_bytes(c, &old, &new);
    f[l4 + 16..l4 + 18].copy_from_slice(&c.to_be_bytes());
}

#[cfg(test)]
#[path = "tcp_tests.rs"]
mod tests;
