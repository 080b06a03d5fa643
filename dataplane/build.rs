//! Builds the XDP program (C, clang -target bpf) into a libbpf-rs skeleton.

use libbpf_cargo::SkeletonBuilder;
use std::env;
use std::path::PathBuf;

const SRC: &str = "src/bpf/tandem.bpf.c";

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR set by cargo"));
    let arch = env::var("CARGO_CFG_TARGET_ARCH").expect("target arch");
    // clang -target bpf does not search Debian's multiarch include dir.
    let multiarch = format!("-I/usr/include/{arch}-linux-gnu");
    SkeletonBuilder::new()
        .source(SRC)
        .clang_args([multiarch])
        .build_and_generate(out.join("tandem.skel.rs"))
        .unwrap_or_else(|e| panic!("building {SRC} (needs clang, libelf-dev): {e}"));
    println!("cargo:rerun-if-changed={SRC}");
}
