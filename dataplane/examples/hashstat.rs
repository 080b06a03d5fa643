use rustc_hash::{FxBuildHasher, FxHashMap};
use std::hash::BuildHasher;
use std::net::Ipv4Addr;
use tandem_dataplane::session::*;
fn main() {
    let n = 1_000_000u32;
    let mut buckets: FxHashMap<u64, u32> = FxHashMap::default();
    let mut tags: FxHashMap<u32, u32> = FxHashMap::default();
    let mask = (1u64 << 21) - 1;
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
        let h = FxBuildHasher.hash_one(&k);
        let tag = (h ^ (h >> 32)) as u32;
        let spread = u64::from(tag).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        *buckets.entry(spread & mask).or_default() += 1;
        *tags.entry(tag).or_default() += 1;
    }
    let maxb = buckets.values().max().unwrap();
    println!(
        "distinct buckets {} of {} keys (ideal ~{}), max per bucket {}",
        buckets.len(),
        n,
        (2u64 << 20) as f64 * (1.0 - (-(n as f64) / (2u64 << 20) as f64).exp()),
        maxb
    );
    println!("distinct tags {}", tags.len());
}
#[allow(dead_code)]
fn unused() {}
