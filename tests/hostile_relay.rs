//! The relay as the adversary: the real relay, in this test's process, with
//! a [`Hostile`] adversary that records, replays, forges and mangles what
//! passes between two real agent processes. Each test names the attack and
//! the part of the argument in `docs/protocol.md` it checks. What every
//! one shows: an application sees the exact bytes its peer wrote, in order,
//! or a reset; a target is dialled once per `Open` its peer sent; and no
//! agent seals two records under one key and nonce (the ledger of the
//! nonces the relay saw stays free of repeats).

mod common;
#[path = "common/hostile_setup.rs"]
mod hostile_setup;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use comsat_protocol::Side;
use comsat_protocol::msg::PeerFrame;
use comsat_tests::hostile::{DatagramAttack, FrameAttack, RecordAttack, Recording};
use hostile_setup::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// Attack: record a whole finished flow (header, `Open`, data, `Fin`) and
/// write it again on a new stream to the accepting agent, in the same
/// session. Checks: a flow id is accepted once per session (protocol.md,
/// "Flow ids"), so the target is not dialled again, the request is not
/// delivered again, and the agent seals nothing (no answer under a used
/// nonce).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_flow_replayed_on_a_new_stream_is_refused() -> Result<()> {
    let (addr, target) = target().await?;
    let sys = Setup::start(addr).await?;

    let request = b"POST /transfer amount=100";
    let answer = sys.request(request).await?;
    assert_eq!(answer, b"got 25 bytes");
    let recording = sys.finished_flow_of_a().await?;
    sys.wait_flows_closed(Side::B).await?;
    assert_eq!(target.dials(), 1);

    let back = sys.inject(Side::B, &recording.replay_bytes()).await?;
    assert!(
        back.is_empty(),
        "agent B answered a replayed flow: {back:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(target.dials(), 1, "the replayed flow dialled the target");
    assert_eq!(target.received.lock().expect("lock").len(), 1);
    assert!(
        sys.log(Side::B).contains("replayed flow refused"),
        "agent B's log does not name the replay:\n{}",
        sys.log(Side::B)
    );
    assert_eq!(
        sys.metric(
            Side::B,
            "comsat_agent_peer_refused_total{reason=\"replayed_flow\"}"
        )?,
        1.0
    );
    // The link still works, and the next flow is a new one.
    assert_eq!(sys.request(b"again").await?, b"got 5 bytes");
    assert_eq!(target.dials(), 2);
    sys.assert_no_nonce_reused();
    Ok(())
}

/// Attack: record the `Open` of a flow whose target cannot be reached (the
/// accepting agent answered with a sealed `Reset` at seq 0) and write it
/// again on a new stream; then write that `Reset` as a flow of its own to
/// both agents. Checks: the id was taken before dialling
/// (protocol.md, "Flow ids"), so the replay is refused without a second
/// dial and without a second `Reset` sealed at the same nonce.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_open_of_an_unreachable_target_is_refused() -> Result<()> {
    // A port with nothing behind it.
    let closed = TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
    let sys = Setup::start(format!("tcp://{closed}")).await?;

    let mut s = TcpStream::connect(sys.listen).await?;
    s.write_all(b"hello").await?;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(WAIT, s.read_to_end(&mut buf)).await?;
    assert!(
        read.is_err() || buf.is_empty(),
        "an unreachable target answered"
    );
    // A's flow (its Open), and B's answer: a sealed Reset.
    let deadline = Instant::now() + WAIT;
    let (recording, resets) = loop {
        let a = sys
            .hostile
            .recordings()
            .into_iter()
            .find(|r| r.sealer == Side::A && r.opener);
        let b = a
            .as_ref()
            .and_then(|a| sys.hostile.recording(a.flow, Side::B));
        if let (Some(a), Some(b)) = (a, b)
            && !b.bytes.lock().expect("lock").is_empty()
        {
            break (a, b);
        }
        anyhow::ensure!(Instant::now() < deadline, "B sealed no Reset");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(count(&sys.log(Side::B), "cannot reach target"), 1);

    let back = sys.inject(Side::B, &recording.replay_bytes()).await?;
    assert!(back.is_empty(), "agent B sealed an answer again: {back:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        count(&sys.log(Side::B), "cannot reach target"),
        1,
        "the replayed Open dialled the target again"
    );
    assert!(sys.log(Side::B).contains("replayed flow refused"));
    // B's sealed Reset, written again as a flow to either agent, opens
    // nothing either.
    let reset_as_flow = Recording {
        opener: true,
        ..resets
    }
    .replay_bytes();
    for side in [Side::A, Side::B] {
        let back = sys.inject(side, &reset_as_flow).await?;
        assert!(back.is_empty(), "{side:?} answered a replayed Reset");
    }
    assert_eq!(count(&sys.log(Side::B), "cannot reach target"), 1);
    sys.assert_no_nonce_reused();
    Ok(())
}

/// Attack: write a finished flow again to the agent that sent it (a
/// reflection), and the accepting agent's answers as a new flow to either
/// agent. Checks: each direction has its own key and only the target side
/// accepts flows (protocol.md, "Keys and nonces"), so nothing is dialled or
/// delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_reflected_or_its_answers_replayed_is_refused() -> Result<()> {
    let (addr, target) = target().await?;
    let sys = Setup::start(addr).await?;
    assert_eq!(sys.request(b"ping").await?, b"got 4 bytes");
    let recording = sys.finished_flow_of_a().await?;
    sys.wait_flows_closed(Side::B).await?;

    // A's own flow, back to A.
    let back = sys.inject(Side::A, &recording.replay_bytes()).await?;
    assert!(back.is_empty(), "agent A answered its own flow: {back:?}");
    // B's answers, with the flow's header, to B and to A.
    let answers = sys
        .hostile
        .recording(recording.flow, Side::B)
        .context("B's answers not recorded")?;
    let as_flow = Recording {
        opener: true,
        ..answers
    }
    .replay_bytes();
    for side in [Side::A, Side::B] {
        let back = sys.inject(side, &as_flow).await?;
        assert!(back.is_empty(), "{side:?} answered B's replayed answers");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(target.dials(), 1);
    assert_eq!(sys.request(b"still works").await?, b"got 11 bytes");
    sys.assert_no_nonce_reused();
    Ok(())
}

/// Attack: replay a flow recorded before agent B restarted. Checks: a new
/// agent run holds a new session (protocol.md, "Sessions"), under whose
/// keys the recorded `Open` does not authenticate: nothing is dialled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_replayed_after_the_agent_restarted_is_refused() -> Result<()> {
    let (addr, target) = target().await?;
    let mut sys = Setup::start(addr).await?;
    assert_eq!(sys.request(b"before").await?, b"got 6 bytes");
    let recording = sys.finished_flow_of_a().await?;
    sys.restart(Side::B)?;
    assert_eq!(sys.request(b"after restart").await?, b"got 13 bytes");
    assert_eq!(target.dials(), 2);

    let back = sys.inject(Side::B, &recording.replay_bytes()).await?;
    assert!(back.is_empty(), "agent B answered an old flow: {back:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        target.dials(),
        2,
        "an old session's flow dialled the target"
    );
    sys.assert_no_nonce_reused();
    Ok(())
}

/// The handshake messages side `from` sent on the link so far.
fn handshakes(sys: &Setup, from: Side) -> Vec<PeerFrame> {
    sys.hostile
        .frames()
        .into_iter()
        .filter(|(l, s, f)| *l == sys.link && *s == from && matches!(f, PeerFrame::Handshake(_)))
        .map(|(_, _, f)| f)
        .collect()
}

/// Attack: replay side A's first handshake message to side B (and B's
/// answer to A) while a flow is open on the session it set up. Checks: side
/// B answers but takes a new session only once side A seals under it
/// (protocol.md, "Sessions"), so the working session and its open flow go
/// on untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_handshake_does_not_tear_down_a_working_session() -> Result<()> {
    let sys = Setup::start(echo_target().await?).await?;
    let mut flow = TcpStream::connect(sys.listen).await?;
    echoed(&mut flow, b"before the replay").await?;

    let from_a = handshakes(&sys, Side::A);
    let from_b = handshakes(&sys, Side::B);
    assert!(
        !from_a.is_empty() && !from_b.is_empty(),
        "no handshake seen"
    );
    for _ in 0..3 {
        for m in &from_a {
            assert!(sys.relay.send_peer_frame(sys.link, Side::B, m.clone()));
        }
        for m in &from_b {
            assert!(sys.relay.send_peer_frame(sys.link, Side::A, m.clone()));
        }
    }
    // Side B answered each replay (it cannot tell them from a new
    // handshake), and side A refused the unexpected answers.
    let deadline = Instant::now() + WAIT;
    while handshakes(&sys, Side::B).len() < from_b.len() + 3 {
        if Instant::now() > deadline {
            bail!("side B did not answer the replayed handshakes");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    echoed(&mut flow, b"after the replay: the same flow").await?;
    flow.shutdown().await?;
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, flow.read_to_end(&mut rest)).await??;
    assert!(rest.is_empty());
    for side in [Side::A, Side::B] {
        assert!(
            !sys.log(side).contains("resetting the old session's flows"),
            "{side:?} replaced its session:\n{}",
            sys.log(side)
        );
        assert_eq!(sys.metric(side, "comsat_agent_flows_failed_total")?, 0.0);
    }
    sys.assert_no_nonce_reused();
    Ok(())
}

/// Attack: replay side A's handshake message from before agent A restarted
/// to side B, which holds the session the restarted agent set up since.
/// Checks: the old message is answered, never confirmed (protocol.md,
/// "Sessions"): B keeps the new session and its flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_replayed_after_an_agent_restart_changes_nothing() -> Result<()> {
    let mut sys = Setup::start(echo_target().await?).await?;
    let old = handshakes(&sys, Side::A);
    sys.restart(Side::A)?;
    let mut flow = TcpStream::connect(sys.listen).await?;
    echoed(&mut flow, b"new session").await?;
    let answers = handshakes(&sys, Side::B).len();

    for m in &old {
        assert!(sys.relay.send_peer_frame(sys.link, Side::B, m.clone()));
    }
    let deadline = Instant::now() + WAIT;
    while handshakes(&sys, Side::B).len() < answers + old.len() {
        if Instant::now() > deadline {
            bail!("side B did not answer the replayed handshake");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    echoed(&mut flow, b"still the new session").await?;
    assert_eq!(sys.metric(Side::B, "comsat_agent_flows_failed_total")?, 0.0);
    sys.assert_no_nonce_reused();
    Ok(())
}

/// Runs one flow of 1 MiB through a link whose relay attacks its records
/// as `attack` says; returns whether the flow delivered every byte (else
/// it was reset, having delivered a prefix).
async fn attacked_flow(attack: RecordAttack) -> Result<bool> {
    let (addr, target) = target().await?;
    let sys = Setup::start(addr).await?;
    sys.hostile.set_record_attack(attack);
    let sent = payload(7, 1 << 20);
    let answer = send_through(sys.listen, &sent).await?;
    let exact = exact_or_reset(&sent, &target.delivered(0).await?, &answer);
    assert_eq!(sys.hostile.attacks_done(), 1, "the attack did not happen");
    // The link carries the next flow untouched.
    let next = payload(8, 100_000);
    let answer = send_through(sys.listen, &next).await?;
    assert!(exact_or_reset(&next, &target.delivered(1).await?, &answer));
    assert_eq!(target.dials(), 2);
    sys.assert_no_nonce_reused();
    Ok(exact)
}

/// Attack: flip one bit in a data record's ciphertext. Checks: every
/// record is authenticated under its flow's nonce (protocol.md, "Records"):
/// the altered record is never delivered; the flow is reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_bit_in_a_record_is_never_delivered() -> Result<()> {
    let exact = attacked_flow(RecordAttack::FlipBit(3)).await?;
    assert!(!exact, "a flow with an altered record completed");
    Ok(())
}

/// Attack: send a data record twice. Checks: a receiver takes each
/// sequence number once (protocol.md, "Records"): delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicated_record_is_delivered_once() -> Result<()> {
    let exact = attacked_flow(RecordAttack::Duplicate(3)).await?;
    assert!(exact, "a duplicated record lost the flow");
    Ok(())
}

/// Attack: leave a data record out. Checks: sequence numbers are
/// contiguous (protocol.md, "Records"): the gap is never skipped over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_record_never_goes_missing_unnoticed() -> Result<()> {
    attacked_flow(RecordAttack::Drop(3)).await?;
    Ok(())
}

/// Attack: swap two data records. Checks: records are delivered in
/// sequence order only (protocol.md, "Records").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapped_records_are_never_delivered_out_of_order() -> Result<()> {
    attacked_flow(RecordAttack::Swap(3)).await?;
    Ok(())
}

/// Attack: cut a record short and end the stream. Checks: a record is
/// delivered whole or not at all (protocol.md, "Records"); the flow goes
/// on on a new stream or is reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_cut_short_is_never_delivered_in_part() -> Result<()> {
    attacked_flow(RecordAttack::Truncate(3)).await?;
    Ok(())
}

/// Attack: hold a record back for 1.5 s. Checks: a relay can delay
/// (protocol.md, "What a relay can do"), and nothing else changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_record_arrives_in_its_place() -> Result<()> {
    let exact = attacked_flow(RecordAttack::Delay(3, 1500)).await?;
    assert!(exact, "a delayed record lost the flow");
    Ok(())
}

/// Attack: reset a flow's stream in the middle. Checks: a flow survives
/// the loss of its stream (protocol.md, "What a relay can do"): it resumes
/// on a new one, every byte exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_reset_by_the_relay_resumes_without_loss() -> Result<()> {
    let exact = attacked_flow(RecordAttack::Reset(3)).await?;
    assert!(exact, "a flow whose stream was reset lost bytes");
    Ok(())
}

/// Attack: open streams of the relay's own: a new flow id with a record of
/// random bytes, and one with a well-framed record that claims to be an
/// `Open`, to both agents. Checks: only an `Open` sealed by the peer opens
/// a flow (protocol.md, "Flow ids"): nothing is dialled or answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_injected_by_the_relay_open_nothing() -> Result<()> {
    let (addr, target) = target().await?;
    let sys = Setup::start(addr).await?;
    for (flow, side) in [(1001u32, Side::B), (1002, Side::A), (1003, Side::B)] {
        let mut forged = Vec::new();
        comsat_protocol::record::FlowHeader {
            link_id: sys.link,
            flow_id: flow,
        }
        .write_to(&mut forged);
        comsat_protocol::record::RecordHeader { len: 17, seq: 0 }.write_to(&mut forged);
        forged.extend_from_slice(&payload(u64::from(flow), 17));
        let back = sys.inject(side, &forged).await?;
        assert!(back.is_empty(), "{side:?} answered a forged flow");
        let garbage = payload(9, 300);
        let back = sys.inject(side, &garbage).await?;
        assert!(back.is_empty(), "{side:?} answered garbage");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(target.dials(), 0, "a forged flow dialled the target");
    let sent = payload(3, 1000);
    let answer = send_through(sys.listen, &sent).await?;
    assert!(exact_or_reset(&sent, &target.delivered(0).await?, &answer));
    Ok(())
}

/// Attack: write the records of a finished flow (its `Open`, data and
/// `Fin`), and the `Reset` of a failed one, on a new stream of a flow
/// that is open. Checks: a record's nonce names its flow (protocol.md,
/// "Keys and nonces"): none opens under the other flow, whose
/// application sees its own bytes or a reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_moved_to_another_flow_are_refused() -> Result<()> {
    let sys = Setup::start(echo_target().await?).await?;
    let mut first = TcpStream::connect(sys.listen).await?;
    echoed(&mut first, b"a finished flow").await?;
    first.shutdown().await?;
    let mut rest = Vec::new();
    first.read_to_end(&mut rest).await?;
    let old = sys.finished_flow_of_a().await?;
    let old_answers = sys
        .hostile
        .recording(old.flow, Side::B)
        .context("answers")?;

    let mut open = TcpStream::connect(sys.listen).await?;
    echoed(&mut open, b"the open flow").await?;
    let current = sys
        .hostile
        .recordings()
        .into_iter()
        .filter(|r| r.sealer == Side::A && r.opener)
        .map(|r| r.flow)
        .max()
        .context("open flow")?;
    assert_ne!(current, old.flow);
    for (side, recording) in [(Side::B, &old), (Side::A, &old_answers)] {
        let moved = Recording {
            flow: current,
            opener: true,
            ..recording.clone()
        };
        let back = sys.inject(side, &moved.replay_bytes()).await?;
        assert!(back.is_empty(), "{side:?} answered moved records");
    }
    // The open flow carries on with its own bytes, or was reset: never
    // the other flow's.
    let more = b"more of the open flow";
    echoed_or_reset(&mut open, more).await;
    sys.assert_no_nonce_reused();
    Ok(())
}

/// Attack: splice a finished flow of one link onto a stream of another
/// link of the same two agents. Checks: the handshake's prologue binds a
/// session to its link (protocol.md, "Sessions"): the other link's session
/// opens nothing of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_spliced_onto_another_link_is_refused() -> Result<()> {
    let (addr, target) = target().await?;
    let sys = Setup::start_links(&[("l", addr.clone()), ("m", addr)]).await?;
    let answer = sys.request(b"on link l").await?;
    assert_eq!(answer, b"got 9 bytes");
    let recording = sys.finished_flow_of_a().await?;
    let (other, _) = sys.links[1];
    let spliced = Recording {
        link: other,
        ..recording
    };
    let back = sys
        .inject_on(other, Side::B, &spliced.replay_bytes())
        .await?;
    assert!(back.is_empty(), "link m answered link l's flow");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(target.dials(), 1, "a spliced flow dialled the target");
    let sent = payload(4, 2000);
    let answer = send_through(sys.links[1].1, &sent).await?;
    assert!(exact_or_reset(&sent, &target.delivered(1).await?, &answer));
    sys.assert_no_nonce_reused();
    Ok(())
}

/// Attack: swap a flow's two directions: write each agent's own records
/// back to it as a new stream of the open flow. Checks: each direction
/// has its own key (protocol.md, "Keys and nonces"): an agent never opens
/// what it sealed; the application sees its own bytes or a reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flows_directions_swapped_are_refused() -> Result<()> {
    let sys = Setup::start(echo_target().await?).await?;
    let mut open = TcpStream::connect(sys.listen).await?;
    echoed(&mut open, b"both ways").await?;
    let flow = sys
        .hostile
        .recordings()
        .first()
        .map(|r| r.flow)
        .context("no flow")?;
    for side in [Side::A, Side::B] {
        let own = sys.hostile.recording(flow, side).context("recording")?;
        let reflected = Recording {
            opener: true,
            ..own
        };
        let back = sys.inject(side, &reflected.replay_bytes()).await?;
        assert!(back.is_empty(), "{side:?} took its own records");
    }
    let more = b"and on";
    echoed_or_reset(&mut open, more).await;
    sys.assert_no_nonce_reused();
    Ok(())
}

/// Attack: write a recording of an open flow (the records it carried so
/// far) again on a new stream of that same flow. Checks: a receiver takes
/// each sequence number once across streams (protocol.md, "Records"):
/// nothing is delivered twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_flows_records_written_again_are_delivered_once() -> Result<()> {
    let sys = Setup::start(echo_target().await?).await?;
    let mut open = TcpStream::connect(sys.listen).await?;
    let mut sent = Vec::new();
    for i in 0..4u64 {
        let chunk = payload(i, 10_000);
        echoed(&mut open, &chunk).await?;
        sent.extend_from_slice(&chunk);
    }
    let flow = sys
        .hostile
        .recordings()
        .first()
        .map(|r| r.flow)
        .context("no flow")?;
    let recording = sys.hostile.recording(flow, Side::A).context("recording")?;
    let _ = sys.inject(Side::B, &recording.replay_bytes()).await?;
    // The echo of everything after the replay is exactly what was sent
    // after it (or the flow was reset): the replayed records were not
    // delivered again (the echo would repeat them).
    let after = payload(99, 20_000);
    echoed_or_reset(&mut open, &after).await;
    sys.assert_no_nonce_reused();
    Ok(())
}

/// Attack: deliver every link-control message twice during a transfer,
/// then replay every sealed message seen to both agents. Checks: sealed
/// messages carry increasing sequence numbers and each is taken once
/// (protocol.md, "Link control"): the transfer is exact, the link works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicated_and_replayed_link_control_changes_nothing() -> Result<()> {
    let (addr, target) = target().await?;
    let sys = Setup::start(addr).await?;
    sys.hostile.set_frame_attack(FrameAttack::Duplicate);
    let sent = payload(5, 4 << 20);
    let answer = send_through(sys.listen, &sent).await?;
    assert!(exact_or_reset(&sent, &target.delivered(0).await?, &answer));
    sys.hostile.set_frame_attack(FrameAttack::None);
    let sealed: Vec<_> = sys
        .hostile
        .frames()
        .into_iter()
        .filter(|(_, _, f)| matches!(f, PeerFrame::Sealed { .. }))
        .collect();
    assert!(!sealed.is_empty(), "no sealed message seen");
    for (link, from, frame) in sealed {
        sys.relay.send_peer_frame(link, from.peer(), frame);
    }
    let next = payload(6, 1 << 20);
    let answer = send_through(sys.listen, &next).await?;
    assert!(exact_or_reset(&next, &target.delivered(1).await?, &answer));
    assert_eq!(answer, b"got 1048576 bytes");
    sys.assert_no_nonce_reused();
    Ok(())
}

/// A relay that sends every datagram of a UDP flow twice, and later sends
/// all of them again, gets each delivered once: the receiving agent's
/// replay window refuses every copy, and counts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagrams_a_relay_repeats_or_replays_are_delivered_once() -> Result<()> {
    const N: usize = 100;
    let sink = UdpSocket::bind("127.0.0.1:0").await?;
    let setup = Setup::start(format!("udp://{}", sink.local_addr()?)).await?;
    setup.hostile.set_datagram_attack(DatagramAttack::Duplicate);
    let client = UdpSocket::bind("127.0.0.1:0").await?;
    client.connect(setup.listen).await?;
    let mut buf = vec![0u8; 2048];
    let replayed = "comsat_agent_udp_datagrams_dropped_total{link=\"l\",reason=\"replayed\"}";
    for i in 0..N {
        let sent = format!("datagram {i}");
        client.send(sent.as_bytes()).await?;
        let n = tokio::time::timeout(Duration::from_secs(5), sink.recv(&mut buf))
            .await
            .context("datagram not delivered")??;
        assert_eq!(&buf[..n], sent.as_bytes());
    }
    comsat_tests::wait_for_metric(setup.agent(Side::B).1, replayed, WAIT, |v| v >= N as f64)
        .await?;

    // Every datagram side A sent, again, straight to side B's connection.
    let conn = setup
        .relay
        .side_connection(setup.link, Side::B)
        .context("side B is not attached")?;
    let recorded: Vec<_> = setup
        .hostile
        .datagrams()
        .into_iter()
        .filter(|(_, from, _)| *from == Side::A)
        .map(|(_, _, d)| d)
        .collect();
    assert_eq!(recorded.len(), N);
    for d in recorded {
        conn.send_datagram(d)?;
    }
    let m = comsat_tests::wait_for_metric(setup.agent(Side::B).1, replayed, WAIT, |v| {
        v >= 2.0 * N as f64
    })
    .await?;
    let again = tokio::time::timeout(Duration::from_secs(1), sink.recv(&mut buf)).await;
    assert!(again.is_err(), "a replayed datagram was delivered again");
    assert_eq!(comsat_tests::metric(&m, replayed), 2.0 * N as f64, "{m}");
    assert_eq!(
        comsat_tests::metric(&m, "comsat_agent_udp_datagrams_received_total{link=\"l\"}"),
        N as f64,
        "{m}"
    );
    Ok(())
}

/// Attack: flip a bit in the `Open` of a flow on a link that hands the
/// caller's identity to its service (an allow rule naming a SPIFFE ID, and
/// the PROXY protocol). Checks: the caller's identity is sealed in the
/// `Open` (protocol.md, "Records"), so the relay can neither read nor
/// change it: an altered `Open` dials nothing, and every connection the
/// service ever gets starts with a header naming the caller's real ID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_identity_cannot_be_changed_by_the_relay() -> Result<()> {
    const ID: &str = "spiffe://example.org/client";
    let (addr, target) = target().await?;
    // This test's process is the caller: admitted by its uid.
    let uid = rustix::process::geteuid().as_raw();
    let sys = Setup::start_with(&[("l", addr)], "", |l| {
        l.allow = vec![format!("{ID} unix:uid:{uid}")];
        l.proxy_protocol = true;
    })
    .await?;
    sys.hostile.set_record_attack(RecordAttack::FlipBit(0));
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        send_through(sys.listen, b"an altered Open"),
    )
    .await;
    assert!(sys.hostile.attacks_done() >= 1, "the attack did not happen");
    sys.hostile.set_record_attack(RecordAttack::None);
    let sent = payload(9, 10_000);
    send_through(sys.listen, &sent).await?;
    // The last connection carried the flow sent untouched; none ever
    // started with another identity.
    let dials = target.dials();
    assert!(dials >= 1);
    for i in 0..dials {
        let (got, _) = target.delivered(i).await?;
        let (header, rest) = comsat_tests::proxy_v2::split(&got)?;
        assert_eq!(header.version_command, 0x21, "PROXY command");
        assert_eq!(header.family, 0x00, "no addresses: locations stay hidden");
        assert_eq!(header.tlv_text(0xE0).as_deref(), Some(ID));
        let selectors = header.tlv_text(0xE1).unwrap_or_default();
        assert!(
            selectors.contains(&format!("unix:uid:{uid}")),
            "{selectors}"
        );
        if i == dials - 1 {
            assert_eq!(rest, sent.as_slice());
        }
    }
    sys.assert_no_nonce_reused();
    Ok(())
}
