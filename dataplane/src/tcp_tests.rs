use super::*;
use Direction::{Forward, Reverse};
use TcpState::{Closed, Established, SynReceived, SynSent, TimeWait};
const NEW: TcpState = TcpState::None;
use proptest::prelude::*;

const C_ISN: u32 = 1_000;
const S_ISN: u32 = 0xffff_ff00; // wraps during the test: sequence arithmetic

fn seg(seq: u32, ack: u32, flags: u8, len: u32) -> Segment {
    Segment {
        seq,
        ack,
        win: 1000,
        flags,
        len,
        wscale: None,
    }
}

/// A session after SYN (wscale 7), SYN-ACK (wscale 7), ACK: both
/// windows 1000 << 7.
fn established() -> (Windows, TcpState) {
    let mut w = Windows::default();
    let mut syn = seg(C_ISN, 0, SYN, 0);
    syn.wscale = Some(7);
    assert_eq!(track(&mut w, NEW, Forward, &syn), Outcome::Accept(SynSent));
    let mut synack = seg(S_ISN, C_ISN + 1, SYN | ACK, 0);
    synack.wscale = Some(7);
    assert_eq!(
        track(&mut w, SynSent, Reverse, &synack),
        Outcome::Accept(SynReceived)
    );
    let ack = seg(C_ISN + 1, S_ISN.wrapping_add(1), ACK, 0);
    assert_eq!(
        track(&mut w, SynReceived, Forward, &ack),
        Outcome::Accept(Established)
    );
    (w, Established)
}

fn s_next() -> u32 {
    S_ISN.wrapping_add(1)
}

#[test]
fn handshake_learns_both_sides_and_the_negotiated_scale() {
    let (w, _) = established();
    let [c, s] = w.sides;
    assert_eq!(
        (c.end, c.scale, s.end, s.scale),
        (C_ISN + 1, 7, s_next(), 7)
    );
    assert!(c.flags & HANDSHAKE != 0 && s.flags & HANDSHAKE != 0);
    // The client may send up to what the server's SYN-ACK allowed (its
    // window taken as scaled: lenient until the server's next ACK) and
    // the server up to the client's ACK plus its scaled window.
    assert_eq!(s.allowed(), C_ISN + 1 + (1000 << 7));
    assert_eq!(c.allowed(), s_next().wrapping_add(1000 << 7));
}

#[test]
fn scale_is_zero_unless_both_sides_offer_it() {
    let mut w = Windows::default();
    let mut syn = seg(C_ISN, 0, SYN, 0);
    syn.wscale = Some(7);
    track(&mut w, NEW, Forward, &syn);
    track(
        &mut w,
        SynSent,
        Reverse,
        &seg(S_ISN, C_ISN + 1, SYN | ACK, 0),
    );
    assert_eq!((w.sides[0].scale, w.sides[1].scale), (0, 0));
}

#[test]
fn in_window_data_is_accepted_and_moves_the_edges() {
    let (mut w, st) = established();
    let d = seg(C_ISN + 1, s_next(), ACK, 500);
    assert_eq!(track(&mut w, st, Forward, &d), Outcome::Accept(Established));
    assert_eq!(w.sides[0].end, C_ISN + 501);
    let reply = seg(s_next(), C_ISN + 501, ACK, 100);
    assert_eq!(
        track(&mut w, st, Reverse, &reply),
        Outcome::Accept(Established)
    );
    assert_eq!(w.sides[1].allowed(), C_ISN + 501 + (1000 << 7));
    assert_eq!(w.sides[1].ack, C_ISN + 501);
}

#[test]
fn data_beyond_the_receivers_window_is_out_of_window() {
    let (mut w, st) = established();
    let before = w;
    // The server allowed 1000 << 7 bytes.
    let d = seg(C_ISN + 1 + (1000 << 7) + 1, s_next(), ACK, 10);
    assert_eq!(
        track(&mut w, st, Forward, &d),
        Outcome::Invalid(Invalid::OutOfWindow)
    );
    assert_eq!(w, before, "a refused segment teaches nothing");
}

#[test]
fn an_ack_of_data_never_sent_is_out_of_window() {
    let (mut w, st) = established();
    let d = seg(C_ISN + 1, s_next().wrapping_add(5000), ACK, 0);
    assert_eq!(
        track(&mut w, st, Forward, &d),
        Outcome::Invalid(Invalid::OutOfWindow)
    );
}

#[test]
fn a_retransmission_inside_the_window_is_accepted() {
    let (mut w, st) = established();
    track(&mut w, st, Forward, &seg(C_ISN + 1, s_next(), ACK, 800));
    assert_eq!(
        track(&mut w, st, Forward, &seg(C_ISN + 1, s_next(), ACK, 800)),
        Outcome::Accept(Established)
    );
}

#[test]
fn exact_rst_closes() {
    let (mut w, st) = established();
    // The server's RCV.NXT is what it acked last; its SYN-ACK acked C_ISN+1.
    let rst = seg(C_ISN + 1, 0, RST, 0);
    assert_eq!(track(&mut w, st, Forward, &rst), Outcome::Accept(Closed));
}

#[test]
fn rst_at_the_senders_snd_nxt_closes_while_data_is_in_flight() {
    let (mut w, st) = established();
    track(&mut w, st, Forward, &seg(C_ISN + 1, s_next(), ACK, 300));
    let rst = seg(C_ISN + 301, 0, RST | ACK, 0);
    assert_eq!(track(&mut w, st, Forward, &rst), Outcome::Accept(Closed));
}

#[test]
fn in_window_rst_that_is_not_exact_gets_a_challenge_ack() {
    let (mut w, st) = established();
    let rst = seg(C_ISN + 200, 0, RST, 0);
    assert_eq!(
        track(&mut w, st, Forward, &rst),
        Outcome::Challenge(Challenge {
            seq: s_next(),
            ack: C_ISN + 1,
            win: 1000,
        })
    );
}

#[test]
fn blind_rst_outside_the_window_is_dropped() {
    let (mut w, st) = established();
    let rst = seg(C_ISN.wrapping_add(0x8000_0000), 0, RST, 0);
    assert_eq!(
        track(&mut w, st, Forward, &rst),
        Outcome::Invalid(Invalid::RstOutOfWindow)
    );
    let rst = seg(s_next().wrapping_add(0x4000_0000), 0, RST, 0);
    assert_eq!(
        track(&mut w, st, Reverse, &rst),
        Outcome::Invalid(Invalid::RstOutOfWindow)
    );
}

#[test]
fn syn_in_an_established_session_passes_unchanged() {
    let (mut w, st) = established();
    let before = w;
    assert_eq!(
        track(&mut w, st, Forward, &seg(77, 0, SYN, 0)),
        Outcome::Pass
    );
    assert_eq!(w, before);
}

#[test]
fn syn_after_time_wait_reopens_the_session() {
    let (mut w, _) = established();
    assert_eq!(
        track(&mut w, TimeWait, Forward, &seg(9_999, 0, SYN, 0)),
        Outcome::Accept(SynSent)
    );
    assert_eq!(w.sides[0].end, 10_000);
    assert_eq!(w.sides[1], Side::default());
}

#[test]
fn syn_ack_that_does_not_ack_the_syn_is_refused() {
    let mut w = Windows::default();
    track(&mut w, NEW, Forward, &seg(C_ISN, 0, SYN, 0));
    assert_eq!(
        track(&mut w, SynSent, Reverse, &seg(S_ISN, 5, SYN | ACK, 0)),
        Outcome::Invalid(Invalid::SynAckMismatch)
    );
}

#[test]
fn refused_connection_rst_acking_the_syn_closes() {
    let mut w = Windows::default();
    track(&mut w, NEW, Forward, &seg(C_ISN, 0, SYN, 0));
    assert_eq!(
        track(&mut w, SynSent, Reverse, &seg(0, C_ISN + 1, RST | ACK, 0)),
        Outcome::Accept(Closed)
    );
    let mut w = Windows::default();
    track(&mut w, NEW, Forward, &seg(C_ISN, 0, SYN, 0));
    assert_eq!(
        track(&mut w, SynSent, Reverse, &seg(0, 42, RST | ACK, 0)),
        Outcome::Invalid(Invalid::RstOutOfWindow)
    );
}

#[test]
fn bad_flag_combinations_are_invalid() {
    let (mut w, st) = established();
    for flags in [SYN | RST, SYN | FIN, 0, FIN] {
        assert_eq!(
            track(&mut w, st, Forward, &seg(C_ISN + 1, s_next(), flags, 0)),
            Outcome::Invalid(Invalid::BadFlags),
            "flags {flags:#x}"
        );
    }
}

#[test]
fn picked_up_session_accepts_anything_until_both_sides_are_seen() {
    let mut w = Windows::default();
    // Mid-stream, a synced session after a failover: sequence numbers the
    // node never saw.
    assert_eq!(
        track(&mut w, Established, Forward, &seg(50_000, 90_000, ACK, 100)),
        Outcome::Accept(Established)
    );
    // An old retransmission first, from the server.
    assert_eq!(
        track(
            &mut w,
            Established,
            Reverse,
            &seg(89_000, 50_100, ACK, 1000)
        ),
        Outcome::Accept(Established)
    );
    assert!(w.sides.iter().all(|s| s.flags & SEEN != 0));
    assert!(w.sides.iter().all(|s| s.flags & HANDSHAKE == 0));
}

/// A session picked up mid-stream (no handshake seen) after one segment
/// each way: the client sent 50,000..50,100, the server acked it.
fn picked_up_and_seen_both_ways() -> Windows {
    let mut w = Windows::default();
    track(&mut w, Established, Forward, &seg(50_000, 90_000, ACK, 100));
    track(&mut w, Established, Reverse, &seg(90_000, 50_100, ACK, 0));
    w
}

#[test]
fn picked_up_session_rejects_a_blind_rst_once_the_receiver_acked() {
    let mut w = picked_up_and_seen_both_ways();
    // The client's RCV.NXT is 90,000, the server's 50,100.
    assert_eq!(
        track(
            &mut w,
            Established,
            Reverse,
            &seg(90_000u32.wrapping_add(0x9000_0000), 0, RST, 0)
        ),
        Outcome::Invalid(Invalid::RstOutOfWindow)
    );
    assert!(matches!(
        track(&mut w, Established, Reverse, &seg(90_500, 0, RST, 0)),
        Outcome::Challenge(_)
    ));
    assert_eq!(
        track(&mut w, Established, Forward, &seg(50_100, 0, RST, 0)),
        Outcome::Accept(Closed)
    );
}

#[test]
fn picked_up_rst_before_the_receiver_is_known_passes_without_closing() {
    let mut w = Windows::default();
    assert_eq!(
        track(&mut w, Established, Forward, &seg(1, 0, RST, 0)),
        Outcome::Pass
    );
}

#[test]
fn picked_up_session_tightens_to_its_seen_windows() {
    let mut w = picked_up_and_seen_both_ways();
    // 2^31 ahead of anything either side allowed: refused now.
    assert_eq!(
        track(
            &mut w,
            Established,
            Forward,
            &seg(50_100u32.wrapping_add(0x8000_0000), 90_000, ACK, 10)
        ),
        Outcome::Invalid(Invalid::OutOfWindow)
    );
    assert_eq!(
        track(&mut w, Established, Forward, &seg(50_100, 90_000, ACK, 10)),
        Outcome::Accept(Established)
    );
}

#[test]
fn options_parser_stops_at_malformed_options() {
    let opts = [2, 4, 5, 0xb4, 1, 3, 3, 7, 4, 0];
    let got: Vec<_> = Options::new(&opts)
        .map(|(kind, data)| (kind, &opts[data]))
        .collect();
    assert_eq!(got, vec![(2, &[5u8, 0xb4][..]), (3, &[7u8][..])]);
    assert_eq!(Options::new(&[2, 1, 0, 0]).count(), 0);
    assert_eq!(Options::new(&[2, 9, 0]).count(), 0);
}

proptest! {
    /// Whatever arrives, in any order, the tracker never panics and a
    /// refused segment never changes what is known.
    #[test]
    fn random_segments_never_panic_and_refusals_change_nothing(
        segs in proptest::collection::vec(
            (any::<u32>(), any::<u32>(), any::<u16>(), any::<u8>(), 0u32..70_000, any::<bool>(), proptest::option::of(0u8..20)),
            1..40)
    ) {
        let mut w = Windows::default();
        let mut state = NEW;
        for (seq, ack, win, flags, len, fwd, wscale) in segs {
            let s = Segment { seq, ack, win, flags, len, wscale };
            let dir = if fwd { Forward } else { Reverse };
            let before = w;
            match track(&mut w, state, dir, &s) {
                Outcome::Accept(n) => state = n,
                _ => prop_assert_eq!(w, before),
            }
        }
    }
}
