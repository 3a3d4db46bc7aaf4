//! `make bench`, SFTP part: uploads with OpenSSH's `sftp` client to smsdrop and, in the same run,
//! to OpenSSH's own `sshd` (a plain process, `internal-sftp`, on another loopback port),
//! alternating, median of `SMSDROP_BENCH_RUNS` (3) runs per file. smsdrop syncs every upload before
//! renaming it; sshd does not. Files: 1 GiB of bytes and a 200 MB CSV (`SMSDROP_BENCH_SFTP_MB` to
//! shrink them).

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Appliance, batches, client_key, peak_rss_kib, reserve};

fn upload(port: u16, key: &Path, user: &str, local: &Path, remote: &str) -> Duration {
    let batch = local.with_extension("batch");
    std::fs::write(&batch, format!("put {} {remote}\n", local.display())).expect("batch");
    let start = Instant::now();
    let out = common::sftp_command(port, key, user, Some(&batch), &["-B", "261120", "-R", "64"])
        .output()
        .expect("sftp");
    let took = start.elapsed();
    assert!(
        out.status.success(),
        "upload failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

fn start_sshd(dir: &Path, port: u16, authorized: &str) -> Child {
    let host_key = dir.join("sshd_host_key");
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&host_key)
        .output()
        .expect("ssh-keygen");
    assert!(out.status.success());
    std::fs::write(dir.join("authorized_keys"), format!("{authorized}\n")).expect("authorized_keys");
    let cfg = dir.join("sshd_config");
    std::fs::write(
        &cfg,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {hk}\nPidFile none\nUsePAM no\nStrictModes no\nAuthorizedKeysFile {d}/authorized_keys\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nSubsystem sftp internal-sftp\n",
            hk = host_key.display(),
            d = dir.display()
        ),
    )
    .expect("sshd_config");
    let _ = std::fs::create_dir_all("/run/sshd");
    let child = Command::new("/usr/sbin/sshd")
        .args(["-D", "-e", "-f"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("sshd (Debian openssh-server)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "sshd did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    if !Path::new("/usr/sbin/sshd").exists() {
        println!("sftp benchmark skipped: /usr/sbin/sshd missing (tests/peers/install.sh installs openssh-server)");
        return;
    }
    let runs: usize = std::env::var("SMSDROP_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let big_mb: u64 = std::env::var("SMSDROP_BENCH_SFTP_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let work = tempfile::tempdir().expect("dir");
    let (key, public) = client_key(work.path(), "id_bench", "ed25519");
    let mut app = Appliance::new(&format!(
        "\n[tenant.bench]\ndefault_region = \"FR\"\nsender = \"ACME\"\nrequire_trigger = true\nmax_file_bytes = \"4 GiB\"\nkeys = [\"{public}\"]\n\n[sftp]\nlisten = \"127.0.0.1:0\"\n"
    ));
    app.start();
    let port = app.port("SFTP server");
    // Held for sshd, which binds it by number (with SO_REUSEADDR).
    let sshd_port = reserve();
    let sshd_dir = work.path().join("sshd");
    std::fs::create_dir_all(&sshd_dir).expect("dir");
    let mut sshd = start_sshd(&sshd_dir, sshd_port.port, &public);
    let user = std::env::var("USER").unwrap_or_else(|_| "root".into());

    let bin = work.path().join("big.bin");
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&bin).expect("create"));
        let block: Vec<u8> = (0..1 << 20)
            .map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        for _ in 0..big_mb {
            f.write_all(&block).expect("write");
        }
    }
    let csv = work.path().join("batch.csv");
    // about 128 bytes a line: 1.55 million lines make 200 MB (scaled with SMSDROP_BENCH_SFTP_MB)
    batches::write_batch(&csv, 1_550_000 * big_mb / 1024, 20).expect("csv");

    println!("sftp upload benchmark: OpenSSH sftp client, loopback, median of {runs} alternating runs");
    println!(
        "{:<12} {:>9} {:>14} {:>12} {:>7}",
        "file", "MB", "smsdrop MB/s", "sshd MB/s", "ratio"
    );
    for (name, local) in [("1 GiB bin", &bin), ("200 MB csv", &csv)] {
        let size = std::fs::metadata(local).map(|m| m.len()).unwrap_or(0);
        let mut ours = Vec::new();
        let mut theirs = Vec::new();
        for run in 0..runs {
            let remote = format!("f{run}.dat");
            ours.push(upload(port, &key, "bench", local, &format!("/inbox/{remote}")));
            let landed = app.inbox("bench").join(&remote);
            assert_eq!(
                std::fs::metadata(&landed).map(|m| m.len()).unwrap_or(0),
                size,
                "landed whole"
            );
            let _ = std::fs::remove_file(&landed);
            let dest = sshd_dir.join(&remote);
            theirs.push(upload(sshd_port.port, &key, &user, local, dest.to_str().expect("path")));
            let _ = std::fs::remove_file(&dest);
        }
        let mb = size as f64 / 1e6;
        let (o, t) = (median(ours), median(theirs));
        println!(
            "{:<12} {:>9.0} {:>14.0} {:>12.0} {:>6.2}x",
            name,
            mb,
            mb / o.as_secs_f64(),
            mb / t.as_secs_f64(),
            t.as_secs_f64() / o.as_secs_f64()
        );
    }
    println!(
        "smsdrop serve peak RSS: {:.1} MiB (target < 64 MiB; throughput target >= 1.3x sshd)",
        peak_rss_kib(app.pid()) as f64 / 1024.0
    );
    let _ = sshd.kill();
    let _ = sshd.wait();
    app.stop();
}
