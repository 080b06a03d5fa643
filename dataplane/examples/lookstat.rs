use std::hint::black_box;
use std::net::Ipv4Addr;
use std::time::Instant;
use tandem_dataplane::session::*;
use tandem_proto::RgId;
fn main() {
    let n: u32 = std::env::args()
        .nth(1)
        .map(|s| s.parse().unwrap())
        .unwrap_or(1_000_000);
    let mut t = SessionTable::new(TableConfig {
        capacity: n as usize,
        ..Default::default()
    });
    let mut keys = Vec::new();
    for i in 0..n {
        let client = Ipv4Addr::from(0x0a00_0000 | (i >> 4));
        let server = Ipv4Addr::new(203, 0, 113, (i % 200) as u8 + 1);
        let k = SessionKey::new(
            client,
            1024 + (i & 15) as u16,
            server,
            443,
            proto::TCP,
            ZoneId(1),
        );
        t.insert(
            NewSession {
                key: k,
                egress_zone: ZoneId(2),
                snat: None,
                dnat: None,
                ingress_if: InterfaceId(1),
                egress_if: InterfaceId(2),
                owner_rg: RgId(1),
                policy: PolicyId(1),
                tcp_state: TcpState::Established,
            },
            Millis(1),
        )
        .unwrap();
        keys.push(k);
    }
    for pass in 0..3 {
        let s = Instant::now();
        for k in &keys {
            black_box(t.lookup_forward(k));
        }
        println!(
            "sequential pass {pass}: {:.1} ns",
            s.elapsed().as_nanos() as f64 / n as f64
        );
    }
    let mut x = 88172645463325252u64;
    for i in (1..keys.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        keys.swap(i, (x % (i as u64 + 1)) as usize);
    }
    for pass in 0..3 {
        let s = Instant::now();
        for k in &keys {
            black_box(t.lookup_forward(k));
        }
        println!(
            "random pass {pass}: {:.1} ns",
            s.elapsed().as_nanos() as f64 / n as f64
        );
    }
}
