//! Sweeps as jobs (`vqt-train tune`): plan / run / collect, the local executor with several
//! workers, `xargs -P` over the job file, and the SLURM executor on a real one-node SLURM
//! cluster started on localhost for the test.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::{bin, config, tmp, vtab_task_tree};

/// Two VTAB tasks (generated NOAH trees) and the tiny ViT; returns (config, `--set` of the data).
fn sweep_setup(d: &Path) -> (PathBuf, String) {
    let cfg = config(d, "kind = \"linear\"", "auto");
    vtab_task_tree(&d.join("vtab"), "eurosat");
    vtab_task_tree(&d.join("vtab"), "dtd");
    let data = format!("data={{kind=\"vtab\",root=\"{}\",task=\"eurosat\",check_counts=false}}", d.join("vtab").display());
    (cfg, data)
}

fn tune_args<'a>(cfg: &'a Path, data: &'a str) -> Vec<String> {
    [
        "tune",
        "--config",
        cfg.to_str().unwrap(),
        "--set",
        data,
        "--set",
        "train.epochs=1",
        "--tasks",
        "eurosat,dtd",
        "--grid",
        "train.lr=[0.001,0.05]",
        "--seeds",
        "42,43",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn ok(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "{:?}: {}\n{}", cmd, String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

fn lines(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// The numbers of a report (every task's grid accuracies, chosen setting and test accuracies).
fn numbers(r: &Value) -> Vec<(Value, Value, Value)> {
    r["tasks"].as_array().unwrap().iter().map(|t| (t["grid"].clone(), t["best"].clone(), t["test"].clone())).collect()
}

#[test]
fn a_planned_sweep_runs_through_xargs_and_local_workers_and_collects_the_same_table() {
    let d = tmp("sweep-local");
    let (cfg, data) = sweep_setup(&d);

    // Plan only: the job files, nothing run.
    let plan = d.join("plan");
    let out = ok(bin().args(tune_args(&cfg, &data)).arg("--plan").arg(&plan));
    assert!(out.contains("planned") && out.contains("grid.commands"), "{out}");
    let grid = lines(&plan.join("grid.jsonl"));
    assert_eq!(grid.len(), 4, "2 tasks x 2 settings");
    let j = &grid[1];
    assert_eq!((j["id"].as_str(), j["phase"].as_str(), j["task"].as_str()), (Some("grid/eurosat/1"), Some("grid"), Some("eurosat")));
    assert_eq!(j["setting"], serde_json::json!(["train.lr=0.05"]));
    assert_eq!(j["out_dir"], serde_json::json!(plan.join("eurosat/grid-1")));
    let argv: Vec<&str> = j["argv"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert!(argv.contains(&"train") && argv.ends_with(&["--reuse"]) && argv.contains(&"train.lr=0.05"), "{argv:?}");
    assert!(j["command"].as_str().unwrap().starts_with("cd "), "{j}");
    assert!(j["overrides"][0].as_str().unwrap().contains("test_split = \"val200\""), "grid jobs never read test: {j}");
    assert!(!plan.join("eurosat/grid-0").exists(), "planning runs nothing");
    let base = std::fs::read_to_string(plan.join("base.toml")).unwrap();
    assert!(base.contains("[backbone]") && base.contains("epochs = 1"), "{base}");
    assert!(!plan.join("final.jsonl").exists());

    // Collect before anything ran: every grid job is listed, exit code 1, no mean.
    let o = bin().args(["tune", "--collect"]).arg(&plan).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", String::from_utf8_lossy(&o.stderr));
    let md = std::fs::read_to_string(plan.join("tune.md")).unwrap();
    assert!(md.contains("**Incomplete**: 4 job(s)") && md.contains("`grid/dtd/1`: not started") && !md.contains("Mean over"), "{md}");

    // The grid phase through xargs -P 2 over the plain command file.
    ok(Command::new("sh").arg("-c").arg(format!("xargs -P 2 -d '\\n' -I{{}} sh -c {{}} < '{}'", plan.join("grid.commands").display())));
    let r = json(&{
        let _ = bin().args(["tune", "--collect"]).arg(&plan).output().unwrap();
        plan.join("tune.json")
    });
    assert_eq!(r["missing"].as_array().unwrap().len(), 4, "the selection wrote 4 final jobs, none run yet: {r}");
    assert!(r["missing"].as_array().unwrap().iter().all(|m| m["id"].as_str().unwrap().starts_with("final/")));
    assert_eq!(r["task_mean"], Value::Null, "no mean over incomplete tasks");
    let finals = lines(&plan.join("final.jsonl"));
    assert_eq!(finals.len(), 4);
    assert!(finals[0]["overrides"][0].as_str().unwrap().contains("train_split = \"train800val200\""));

    // The final phase through the local executor with 2 workers; then the table.
    let o = ok(bin().args(["tune", "--run"]).arg(&plan).args(["--workers", "2"]));
    assert!(o.contains("| eurosat | Specialized |") && o.contains("Mean of the 2 group means"), "{o}");
    let planned = json(&plan.join("tune.json"));
    assert!(planned["missing"].as_array().unwrap().is_empty());

    // The same sweep in one command (plan + local executor) gives the same numbers.
    let direct = d.join("direct");
    ok(bin().args(tune_args(&cfg, &data)).arg("--out").arg(&direct).args(["--workers", "2"]));
    let direct_r = json(&direct.join("tune.json"));
    assert_eq!(numbers(&direct_r), numbers(&planned));

    // Idempotent: rerunning does no work; an interrupted job is resumed to the same result.
    let run_json = direct.join("dtd/final-seed-43/run.json");
    let before = std::fs::metadata(&run_json).unwrap().modified().unwrap();
    ok(bin().args(["tune", "--run"]).arg(&direct));
    assert_eq!(std::fs::metadata(&run_json).unwrap().modified().unwrap(), before, "a complete job is not rerun");
    std::fs::remove_file(&run_json).unwrap();
    let o = bin().args(["tune", "--collect"]).arg(&direct).output().unwrap();
    assert!(!o.status.success());
    assert!(std::fs::read_to_string(direct.join("tune.md")).unwrap().contains("`final/dtd/seed-43`: interrupted or failed"));
    ok(bin().args(["tune", "--run"]).arg(&direct));
    assert_eq!(numbers(&json(&direct.join("tune.json"))), numbers(&direct_r));

    // `job` runs one line; a bad index or file is one line.
    ok(bin().args(["job", "--file"]).arg(direct.join("grid.jsonl")).args(["--index", "0"]));
    let o = bin().args(["job", "--file"]).arg(direct.join("grid.jsonl")).args(["--index", "9"]).output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("no job 9") && e.trim().lines().count() == 1, "{e}");
    // A setting that does not resolve is refused when planning, naming the job.
    let o = bin().args(tune_args(&cfg, &data)).args(["--grid", "train.lrr=[1]", "--plan"]).arg(d.join("bad")).output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("job grid/eurosat/0") && e.contains("lrr"), "{e}");
}

/// A one-node SLURM cluster on localhost in a temp dir (its own munged socket and key, its own
/// ports); stopped by pid when dropped.
struct Cluster {
    dir: PathBuf,
    conf: PathBuf,
    pids: Vec<(String, PathBuf)>,
}

impl Cluster {
    fn start(dir: &Path) -> Result<Cluster, String> {
        for b in ["munged", "slurmctld", "slurmd", "sbatch", "sinfo"] {
            let found = std::env::var_os("PATH").map(|p| std::env::split_paths(&p).chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")]).any(|d| d.join(b).is_file())).unwrap_or(false);
            if !found {
                return Err(format!("`{b}` not found: install Debian's slurm-wlm (slurmctld, slurmd, munge) (.ci/run does)"));
            }
        }
        std::fs::create_dir_all(dir.join("state")).unwrap();
        std::fs::create_dir_all(dir.join("spool")).unwrap();
        let mut c = Cluster { dir: dir.to_path_buf(), conf: dir.join("slurm.conf"), pids: Vec::new() };
        // munged with its own key and socket.
        let key = dir.join("munge.key");
        let bytes: Vec<u8> = (0..1024u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        std::fs::write(&key, bytes).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let sock = dir.join("munge.sock");
        let munged = if Path::new("/usr/sbin/munged").is_file() { "/usr/sbin/munged" } else { "munged" };
        let o = Command::new(munged)
            .arg("--force")
            .arg(format!("--socket={}", sock.display()))
            .arg(format!("--key-file={}", key.display()))
            .arg(format!("--log-file={}", dir.join("munged.log").display()))
            .arg(format!("--pid-file={}", dir.join("munged.pid").display()))
            .arg(format!("--seed-file={}", dir.join("munged.seed").display()))
            .output()
            .map_err(|e| format!("munged: {e}"))?;
        if !o.status.success() {
            return Err(format!("munged did not start: {}", String::from_utf8_lossy(&o.stderr).trim()));
        }
        c.pids.push(("munged".into(), dir.join("munged.pid")));
        let host = String::from_utf8_lossy(&Command::new("hostname").arg("-s").output().map_err(|e| format!("hostname: {e}"))?.stdout).trim().to_string();
        let port = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let (p1, p2) = (port(), port());
        let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let d = dir.display();
        let conf = format!(
            "ClusterName=vqttest\nSlurmctldHost={host}\nSlurmUser=root\nSlurmdUser=root\nAuthType=auth/munge\nCredType=cred/munge\nAuthInfo=socket={sock}\n\
             ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\nSelectType=select/cons_tres\nSelectTypeParameters=CR_CPU\nMpiDefault=none\n\
             StateSaveLocation={d}/state\nSlurmdSpoolDir={d}/spool\nSlurmctldPidFile={d}/slurmctld.pid\nSlurmdPidFile={d}/slurmd.pid\n\
             SlurmctldLogFile={d}/slurmctld.log\nSlurmdLogFile={d}/slurmd.log\nSlurmctldPort={p1}\nSlurmdPort={p2}\nReturnToService=2\n\
             NodeName={host} CPUs={cpus} RealMemory=2000 State=UNKNOWN\nPartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP\n",
            sock = sock.display()
        );
        std::fs::write(&c.conf, conf).unwrap();
        for (daemon, pid) in [("slurmctld", "slurmctld.pid"), ("slurmd", "slurmd.pid")] {
            let path = if Path::new(&format!("/usr/sbin/{daemon}")).is_file() { format!("/usr/sbin/{daemon}") } else { daemon.to_string() };
            let o = Command::new(path).arg("-f").arg(&c.conf).output().map_err(|e| format!("{daemon}: {e}"))?;
            if !o.status.success() {
                return Err(format!("{daemon} did not start: {} (log: {})", String::from_utf8_lossy(&o.stderr).trim(), dir.join(format!("{daemon}.log")).display()));
            }
            c.pids.push((daemon.into(), dir.join(pid)));
        }
        let t0 = Instant::now();
        loop {
            let o = c.cmd("sinfo").args(["-h", "-o", "%t"]).output().map_err(|e| format!("sinfo: {e}"))?;
            if String::from_utf8_lossy(&o.stdout).trim() == "idle" {
                return Ok(c);
            }
            if t0.elapsed() > Duration::from_secs(60) {
                let log = std::fs::read_to_string(dir.join("slurmctld.log")).unwrap_or_default();
                return Err(format!("the node did not come up in 60 s (sinfo: {:?}; slurmctld.log ends: {:?})", String::from_utf8_lossy(&o.stdout).trim(), log.lines().last().unwrap_or("")));
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("SLURM_CONF", &self.conf);
        c
    }

    fn diagnose(&self) -> String {
        let q = self.cmd("squeue").args(["-h", "-o", "%i %j %T %r"]).output().map(|o| String::from_utf8_lossy(&o.stdout).to_string()).unwrap_or_default();
        format!("squeue: {q}\nslurmctld.log: {}", std::fs::read_to_string(self.dir.join("slurmctld.log")).unwrap_or_default().lines().rev().take(5).collect::<Vec<_>>().join(" | "))
    }
}

fn pid_alive(pid: u32) -> bool {
    // A zombie (exited, not yet reaped by its parent) is not running.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map(|s| !s.split(") ").nth(1).unwrap_or("").starts_with('Z')).unwrap_or(false)
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let pids: Vec<u32> = self.pids.iter().filter_map(|(_, f)| std::fs::read_to_string(f).ok()?.trim().parse().ok()).collect();
        for p in &pids {
            let _ = Command::new("kill").arg(p.to_string()).status();
        }
        let t0 = Instant::now();
        while pids.iter().any(|&p| pid_alive(p)) && t0.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(200));
        }
        for &p in pids.iter().filter(|&&p| pid_alive(p)) {
            let _ = Command::new("kill").args(["-9", &p.to_string()]).status();
        }
    }
}

#[test]
fn a_sweep_runs_on_a_real_slurm_cluster_and_matches_the_local_executor() {
    let d = tmp("sweep-slurm");
    let cluster = match Cluster::start(&d.join("cluster")) {
        Ok(c) => c,
        Err(why) => {
            // CI installs slurm-wlm and sets VQT_REQUIRE_SLURM=1: there this is a failure.
            assert!(std::env::var("VQT_REQUIRE_SLURM").is_err(), "SLURM cluster: {why}");
            eprintln!("skipped: SLURM cluster: {why}");
            return;
        }
    };
    let (cfg, data) = sweep_setup(&d);

    // The chained submission: the grid array, then (afterok) the selection job, which submits
    // the final array and (afterok) the report job.
    let chained = d.join("slurm-chain");
    let o = ok(cluster.cmd(env!("CARGO_BIN_EXE_vqt-train")).args(tune_args(&cfg, &data)).arg("--out").arg(&chained).args(["--executor", "slurm", "--time=10:00", "--cpus-per-task=1"]));
    assert!(o.contains("submitted the grid phase as SLURM job array") && o.contains("--dependency=afterok"), "{o}");
    let script = std::fs::read_to_string(chained.join("slurm/grid.sbatch")).unwrap();
    assert!(script.contains(" job --file ") && script.contains("grid.jsonl") && script.contains("SLURM_ARRAY_TASK_ID"), "{script}");
    let t0 = Instant::now();
    while !chained.join("tune.json").is_file() || !chained.join("final.jsonl").is_file() {
        assert!(t0.elapsed() < Duration::from_secs(600), "the SLURM chain did not finish in 600 s\n{}", cluster.diagnose());
        std::thread::sleep(Duration::from_millis(500));
    }
    // The report job writes tune.json last; wait until SLURM has nothing left.
    while !String::from_utf8_lossy(&cluster.cmd("squeue").args(["-h"]).output().unwrap().stdout).trim().is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(600), "{}", cluster.diagnose());
        std::thread::sleep(Duration::from_millis(300));
    }
    let slurm_r = json(&chained.join("tune.json"));
    assert!(slurm_r["missing"].as_array().unwrap().is_empty(), "{slurm_r}");
    let logs: Vec<String> = std::fs::read_dir(chained.join("logs")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    assert!(logs.iter().any(|l| l.starts_with("slurm-vqt-grid-")) && logs.iter().any(|l| l.starts_with("slurm-vqt-final-")) && logs.iter().any(|l| l.starts_with("slurm-vqt-select-")), "{logs:?}");

    // Foreground mode (`--wait`): each phase with `sbatch --wait`, then the report here.
    let waited = d.join("slurm-wait");
    let o = ok(cluster.cmd(env!("CARGO_BIN_EXE_vqt-train")).args(tune_args(&cfg, &data)).arg("--out").arg(&waited).args(["--executor", "slurm", "--wait"]));
    assert!(o.contains("| dtd | Natural |"), "{o}");

    // The local executor on the same plan gives the same table.
    let local = d.join("local");
    ok(bin().args(tune_args(&cfg, &data)).arg("--out").arg(&local).args(["--workers", "2"]));
    let local_r = json(&local.join("tune.json"));
    assert_eq!(numbers(&slurm_r), numbers(&local_r), "SLURM and local executors agree");
    assert_eq!(numbers(&json(&waited.join("tune.json"))), numbers(&local_r));

    // Stopping the cluster leaves nothing running.
    let pids: Vec<u32> = cluster.pids.iter().filter_map(|(_, f)| std::fs::read_to_string(f).ok()?.trim().parse().ok()).collect();
    assert_eq!(pids.len(), 3, "munged, slurmctld and slurmd pids");
    drop(cluster);
    assert!(pids.iter().all(|&p| !pid_alive(p)), "a daemon survived: {pids:?}");
}
