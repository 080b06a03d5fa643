//! The real `tandem witness` process keeps its grants across a restart:
//! node0 holds RG1 at the witness, the witness is killed and started again
//! on the same state directory, and node1's request is refused while
//! node0's renewal is granted. Without its record (a wiped state
//! directory) the restarted witness grants nothing for one lease. Runs
//! unprivileged on loopback.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tandem_cluster::election::driver::ClusterKey;
use tandem_proto::pb::{self, envelope::Msg};

const KEY: &[u8] = b"witness restart test key";
const LEASE_MS: u32 = 1500;

struct Witness(Child);

impl Drop for Witness {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(dir: &std::path::Path, port: u16) -> Witness {
    let key_file = dir.join("hb.key");
    std::fs::write(&key_file, KEY).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["witness", "--listen", &format!("127.0.0.1:{port}")])
        .args([
            "--key-file",
            key_file.to_str().unwrap(),
            "--cluster-id",
            "3",
        ])
        .args(["--state-dir", dir.join("state").to_str().unwrap()])
        .args(["--max-lease-ms", &LEASE_MS.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start tandem witness");
    Witness(child)
}

fn request(candidate: u32, epoch: u64, id: u64) -> pb::LeaseRequest {
    pb::LeaseRequest {
        rg: 1,
        epoch,
        candidate,
        duration_ms: LEASE_MS,
        request_id: id,
        cluster_id: 3,
    }
}

/// Sends one request and waits for its reply (retrying while the witness
/// starts up).
fn ask(sock: &std::net::UdpSocket, port: u16, req: pb::LeaseRequest) -> pb::LeaseReply {
    let key = ClusterKey::new(KEY);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 2048];
    loop {
        sock.send_to(&key.seal_msg(Msg::LeaseRequest(req)), ("127.0.0.1", port))
            .unwrap();
        if let Ok((n, _)) = sock.recv_from(&mut buf)
            && let Some(Msg::LeaseReply(r)) = key.open_msg(&buf[..n])
            && r.request_id == req.request_id
        {
            return r;
        }
        assert!(Instant::now() < deadline, "the witness never answered");
    }
}

fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn restarted_witness_process_refuses_the_other_node_and_renews_the_holder() {
    let dir = std::env::temp_dir().join(format!("tandem-witness-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();

    let w = start(&dir, port);
    // First start with no record: one lease of quarantine, then node0 gets
    // RG1.
    let first = ask(&sock, port, request(0, 2, 1));
    assert!(!first.granted, "a witness with no record waits one lease");
    std::thread::sleep(Duration::from_millis(u64::from(LEASE_MS) + 100));
    assert!(ask(&sock, port, request(0, 2, 2)).granted);
    drop(w);

    // Restarted on the same state directory, within node0's lease.
    let _w = start(&dir, port);
    let r = ask(&sock, port, request(1, 3, 3));
    assert!(!r.granted, "node1 refused: the record says node0 holds RG1");
    assert_eq!(r.holder, 0);
    assert!(ask(&sock, port, request(0, 2, 4)).granted, "node0 renews");
    let mode = {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(dir.join("state/voter.state"))
            .unwrap()
            .permissions()
            .mode()
    };
    assert_eq!(mode & 0o777, 0o600, "the record is private");
    drop(_w);

    // A corrupted record: nothing is granted for one lease.
    std::fs::write(dir.join("state/voter.state"), b"torn").unwrap();
    let _w = start(&dir, port);
    assert!(!ask(&sock, port, request(0, 2, 5)).granted);
    assert!(!ask(&sock, port, request(1, 3, 6)).granted);
    drop(_w);
    std::fs::remove_dir_all(&dir).unwrap();
}
