//! The real `tandem witness` process as the third raft member: two node
//! members run in this test over loopback QUIC with mutual TLS (a PKI made
//! for the test); node0 owns RG1. Then node1 is stopped and the witness
//! process is killed and started again on its state directory: node0 and
//! the recovered witness are a majority and node0 keeps RG1. A witness with
//! no state refuses to start without `--init`. Runs unprivileged.

use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_cluster::election::driver::{ClusterKey, DatagramSocket};
use tandem_cluster::tls;
use tandem_cluster::witness::{MemoryStore, OwnershipGroup, QuicLink, TICK_MS};
use tandem_dataplane::session::Millis;
use tandem_proto::{Epoch, RgId};

const KEY: &[u8] = b"witness restart test key";
const RG1: RgId = RgId(1);
const NAMES: [&str; 2] = ["node0", "node1"];

struct Witness(Child);

impl Drop for Witness {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn witness(dir: &std::path::Path, addr: SocketAddr, init: bool) -> Command {
    let key_file = dir.join("hb.key");
    std::fs::write(&key_file, KEY).unwrap();
    let arg = |p: std::path::PathBuf| p.to_str().unwrap().to_string();
    let mut c = Command::new(env!("CARGO_BIN_EXE_tandem"));
    c.args([
        "witness",
        "--listen",
        &addr.to_string(),
        "--cluster-id",
        "3",
    ]);
    c.args(["--key-file", &arg(key_file)]);
    c.args(["--ca", &arg(dir.join("pki/ca.pem"))]);
    c.args(["--cert", &arg(dir.join("pki/witness.pem"))]);
    c.args(["--key", &arg(dir.join("pki/witness.key"))]);
    c.args(["--state-dir", &arg(dir.join("state"))]);
    if init {
        c.arg("--init");
    }
    c
}

fn start(dir: &std::path::Path, addr: SocketAddr, init: bool) -> Witness {
    let child = witness(dir, addr, init)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start tandem witness");
    Witness(child)
}

/// node0 and node1 as in-process raft members on their own links.
struct Nodes {
    members: [Option<OwnershipGroup>; 2],
    links: [QuicLink; 2],
    witness: SocketAddr,
    key: ClusterKey,
    epoch: Instant,
}

impl Nodes {
    fn now(&self) -> Millis {
        Millis(1_000 + self.epoch.elapsed().as_millis() as u64)
    }

    fn addr(&self, v: u32) -> SocketAddr {
        match v {
            2 => self.witness,
            n => self.links[n as usize].local_addr().unwrap(),
        }
    }

    /// Runs for `ms`, node0 wanting RG1; `check` sees node0's lease.
    async fn run(&mut self, ms: u64, mut check: impl FnMut(bool, Millis)) {
        let until = Instant::now() + Duration::from_millis(ms);
        let mut last_tick = 0;
        let mut buf = vec![0u8; 65536];
        while Instant::now() < until {
            let now = self.now();
            let tick = now.0 >= last_tick + TICK_MS;
            for n in 0..2 {
                let mut out = Vec::new();
                let wait = Duration::from_micros(100);
                while let Ok(Ok((len, _))) =
                    tokio::time::timeout(wait, self.links[n].recv_from(&mut buf)).await
                {
                    if let (Some(g), Some(msg)) =
                        (self.members[n].as_mut(), self.key.open_msg(&buf[..len]))
                    {
                        out.extend(g.on_message(&msg, now));
                    }
                }
                if let Some(g) = self.members[n].as_mut()
                    && tick
                {
                    out.extend(g.tick(now));
                    if n == 0 {
                        out.extend(g.claim(RG1, Epoch(2), now));
                    }
                }
                for o in out {
                    let to = self.addr(o.to);
                    let _ = self.links[n].send_to(&self.key.seal_msg(o.msg), to).await;
                }
            }
            if tick {
                last_tick = now.0;
            }
            let held = self.members[0].as_ref().is_some_and(|g| g.held(RG1, now));
            check(held, now);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

#[test]
fn restarted_witness_process_keeps_its_raft_state_and_the_owners_lease() {
    let dir = std::env::temp_dir().join(format!("tandem-witness-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let pki = tls::generate_pki("test", &["node0", "node1", "witness"]).unwrap();
    tls::write_pki(&dir.join("pki"), &pki).unwrap();
    let waddr = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();

    // No state and no --init: refused with the reason.
    let out = witness(&dir, waddr, false).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--init"), "{stderr}");

    let w = start(&dir, waddr, true);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _guard = rt.enter();
    let ids = NAMES.map(|n| tls::identity_from_generated(&pki, n, "witness").unwrap());
    let eps = ids.each_ref().map(|id| {
        let sc = tls::server_config(id, Duration::from_secs(3)).unwrap();
        quinn::Endpoint::server(sc, "127.0.0.1:0".parse().unwrap()).unwrap()
    });
    let addrs = eps.each_ref().map(|e| e.local_addr().unwrap());
    let mut eps = eps.into_iter();
    let links = [0, 1].map(|n| {
        let cc = tls::client_config(&ids[n], Duration::from_secs(3)).unwrap();
        let peer = NAMES[1 - n].to_string();
        let dial = vec![(waddr, "witness".to_string()), (addrs[1 - n], peer.clone())];
        QuicLink::new(eps.next().unwrap(), Some(cc), dial, vec![peer])
    });
    let disks = [MemoryStore::default(), MemoryStore::default()];
    let mut nodes = Nodes {
        members: [None, None],
        links,
        witness: waddr,
        key: ClusterKey::new(KEY),
        epoch: Instant::now(),
    };
    let now = nodes.now();
    for (n, disk) in disks.iter().enumerate() {
        let store = Arc::new(disk.clone());
        nodes.members[n] = Some(OwnershipGroup::start(n as u32, 3, 1000, store, now).unwrap());
    }
    let mut got = None;
    rt.block_on(nodes.run(4000, |held, now| {
        if held && got.is_none() {
            got = Some(now);
        }
    }));
    assert!(got.is_some(), "node0 got RG1 through the log");

    // node1 stops; the witness restarts: node0 + witness must carry on.
    nodes.members[1] = None;
    rt.block_on(nodes.run(500, |held, _| {
        assert!(held, "node0 lost RG1 with node1 gone")
    }));
    drop(w);
    let _w = start(&dir, waddr, false);
    rt.block_on(nodes.run(4000, |_, _| {}));
    assert!(
        nodes.members[0].as_ref().unwrap().held(RG1, nodes.now()),
        "node0 holds RG1 through the restarted witness"
    );
    let st = nodes.members[0]
        .as_ref()
        .unwrap()
        .status(&[RG1], nodes.now());
    assert_eq!(st.rgs[0].owner.as_deref(), Some("node0"));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.join("state/raft.state"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the raft state is private");
    drop(_w);
    std::fs::remove_dir_all(&dir).unwrap();
}
