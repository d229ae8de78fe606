//! Compiles Cortex's CUDA kernels (`src/cuda/kernels.cu`) to PTX when the `cuda` feature is
//! on; the default CPU build does nothing here. nvcc is `$CORTEX_NVCC`, else `nvcc` on
//! PATH (`scripts/cuda_env.sh` provides one from PyPI). The PTX targets compute_80, so one
//! build runs on every GPU from Ampere on (the driver compiles it for the GPU at load).

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let source = "src/cuda/kernels.cu";
    println!("cargo:rerun-if-changed={source}");
    println!("cargo:rerun-if-env-changed=CORTEX_NVCC");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = env::var("CORTEX_NVCC").unwrap_or_else(|_| "nvcc".into());
    let status = Command::new(&nvcc)
        .args([
            "--ptx",
            "-O3",
            "-std=c++17",
            "-arch=compute_80",
            "-lineinfo",
            "-o",
        ])
        .arg(out.join("kernels.ptx"))
        .arg(source)
        .status()
        .unwrap_or_else(|e| {
            panic!("running {nvcc} (set CORTEX_NVCC, or use scripts/cuda_env.sh): {e}")
        });
    assert!(status.success(), "{nvcc} failed on {source}");
}
