//! NAT behaviour through a real AF_XDP firewall, judged by a real RFC 5780
//! client: coturn's `turnutils_natdiscovery` in the client namespace
//! against `turnserver` (STUN with two addresses and two ports, so it can
//! answer from another address and port) behind the firewall. Each SNAT
//! filtering mode is configured in turn; the tool must report
//! endpoint-independent mapping, the configured filtering, and
//! hairpinning. Needs root (network namespaces, XDP) and coturn (apt
//! `coturn`, installed by `./dev.sh`); skips with the reason otherwise.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tandem_dataplane::config::NatFiltering;
use tandem_dataplane::core::DropReason;
use tandem_dataplane::os;
use tandem_dataplane::testbed::{Firewall, FirewallSpec, Topo, inside_udp_policy, sh};

fn skip() -> bool {
    if let Err(why) = os::privileged() {
        eprintln!("SKIPPED: NAT netns test needs root with CAP_NET_ADMIN/CAP_SYS_ADMIN: {why}");
        return true;
    }
    for tool in ["turnserver", "turnutils_natdiscovery"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .map_or(true, |s| !s.success())
        {
            eprintln!(
                "SKIPPED: NAT netns test needs {tool} (Debian package coturn; ./dev.sh installs it)"
            );
            return true;
        }
    }
    false
}

/// A STUN server on 192.0.2.100 and 192.0.2.101, ports 3478 and 3479.
struct Stun(Child);

impl Stun {
    fn start(ns: &str) -> Stun {
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "turnserver", "-c", "/dev/null"])
            // Not Debian's /etc/turnserver.conf, which disables RFC 5780.
            .args(["--stun-only", "--no-auth"])
            .args([
                "--listening-ip",
                "192.0.2.100",
                "--listening-ip",
                "192.0.2.101",
            ])
            .args(["--listening-port", "3478", "--alt-listening-port", "3479"])
            .args(["--no-tls", "--no-dtls", "--no-cli", "--simple-log"])
            .args(["--log-file", "/dev/null", "--pidfile", "/dev/null"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start turnserver");
        // Ready once it answers a binding request on both addresses.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !Command::new("ip")
            .args(["netns", "exec", ns, "sh", "-c"])
            .arg("ss -lun | grep -q 192.0.2.101:3479")
            .status()
            .is_ok_and(|s| s.success())
        {
            assert!(Instant::now() < deadline, "turnserver did not listen");
            std::thread::sleep(Duration::from_millis(100));
        }
        Stun(child)
    }
}

impl Drop for Stun {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `turnutils_natdiscovery` from the client namespace, its report.
fn natdiscovery(ns: &str, flags: &[&str]) -> String {
    let out = Command::new("timeout")
        .args(["30", "ip", "netns", "exec", ns, "turnutils_natdiscovery"])
        .args(flags)
        .arg("192.0.2.100")
        .output()
        .expect("run turnutils_natdiscovery");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    eprintln!("--- natdiscovery {flags:?}\n{text}");
    text
}

#[test]
fn rfc5780_discovery_reports_endpoint_independent_mapping_and_the_configured_filtering() {
    if skip() {
        return;
    }
    // (mode, the tool's verdict, unsolicited packets admitted / refused)
    let modes = [
        (
            NatFiltering::EndpointIndependent,
            "NAT with Endpoint Independent Filtering!",
            (1, 0),
        ),
        (
            NatFiltering::AddressDependent,
            "NAT with Address Dependent Filtering!",
            (1, 1),
        ),
        (
            NatFiltering::AddressAndPortDependent,
            "NAT with Address and Port Dependent Filtering!",
            (0, 2),
        ),
    ];
    for (i, (mode, expect, (admitted, refused))) in modes.into_iter().enumerate() {
        let topo = Topo::new(&format!("n{i}"));
        let [client, fw_ns, server] = &topo.ns;
        sh(&[
            "ip",
            "-n",
            server,
            "addr",
            "add",
            "192.0.2.101/24",
            "dev",
            "s0",
        ]);
        let mut spec = FirewallSpec::sample();
        spec.config.snat[0].filtering = mode;
        // The hairpin test's second packet stays inside.
        spec.config.policies.push(inside_udp_policy());
        let fw = Firewall::start_with(fw_ns, spec);
        let _stun = Stun::start(server);
        let report = natdiscovery(client, &["-m", "-f", "-H"]);
        // Through the NAT: the server sees the reth VIP.
        assert!(
            report.contains("UDP reflexive addr: 192.0.2.1:"),
            "{mode:?}: not translated\n{report}"
        );
        assert!(
            report.contains("NAT with Endpoint Independent Mapping!"),
            "{mode:?}: mapping\n{report}"
        );
        assert!(report.contains(expect), "{mode:?}: {expect}\n{report}");
        // The client's packet to its own public endpoint came back to it.
        assert!(
            report.contains("successful hairpinning"),
            "{mode:?}: hairpinning\n{report}"
        );
        tandem_dataplane::session::read(&fw.table)
            .verify_invariants()
            .unwrap();
        let stats = fw.stop();
        let counted = (
            stats.nat_filter_admitted.load(Ordering::Relaxed),
            stats.dropped(DropReason::NatFiltered),
        );
        // Exactly none where none may be; at least one where the tool's
        // probe (which it may repeat) had to be admitted or refused.
        let at_least = |n: u64, want: u64| if want == 0 { n == 0 } else { n >= want };
        assert!(
            at_least(counted.0, admitted) && at_least(counted.1, refused),
            "{mode:?}: (admitted, refused) = {counted:?}, want {:?}",
            (admitted, refused)
        );
    }
}
