//! Builds the BPF programs with clang (`BPF_CLANG` overrides which), and the table of the C
//! map layouts that the layout test compares the Rust mirrors with.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

const PROGRAMS: &[&str] = &["sock_lb"];

fn main() -> anyhow::Result<()> {
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let clang = env::var("BPF_CLANG").unwrap_or_else(|_| "clang".into());
    println!("cargo:rerun-if-env-changed=BPF_CLANG");
    println!("cargo:rerun-if-changed=bpf");
    // Debian keeps asm/types.h under the multiarch directory.
    let arch = env::var("CARGO_CFG_TARGET_ARCH")?;
    let multiarch = format!("/usr/include/{arch}-linux-gnu");
    if !Path::new("/usr/include/bpf/bpf_helpers.h").exists() {
        bail!(
            "/usr/include/bpf/bpf_helpers.h is missing: the BPF programs need libbpf's headers; \
             install Debian's libbpf-dev (`make deps`)"
        );
    }
    for name in PROGRAMS {
        let src = format!("bpf/{name}.bpf.c");
        let obj = out.join(format!("{name}.bpf.o"));
        run(Command::new(&clang)
            .args(["-target", "bpf", "-O2", "-g", "-Wall", "-Werror"])
            .arg(format!("-I{multiarch}"))
            .args(["-Ibpf/include", "-c", &src, "-o"])
            .arg(&obj))
        .with_context(|| format!("building {src} with {clang}"))?;
    }
    let layout = out.join("layout");
    run(Command::new(&clang)
        .args(["-O0", "-Ibpf/include", "bpf/include/layout.c", "-o"])
        .arg(&layout))
    .with_context(|| format!("building bpf/include/layout.c with {clang}"))?;
    let table = Command::new(&layout)
        .output()
        .context("running the layout printer")?;
    if !table.status.success() {
        bail!("the layout printer failed: {}", table.status);
    }
    std::fs::write(out.join("layout.rs"), table.stdout)?;
    Ok(())
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let output = cmd.output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            anyhow::anyhow!(
                "`{program}` was not found: the BPF programs are C built by clang; install \
                 Debian's clang (`make deps`) or point BPF_CLANG at one"
            )
        } else {
            anyhow::Error::new(e).context(format!("starting `{program}`"))
        }
    })?;
    if !output.status.success() {
        bail!(
            "`{program}` failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}
