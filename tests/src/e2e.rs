//! `weft-lab e2e`: Kubernetes' own sig-network conformance tests against the running lab
//! cluster (`weft-lab up --cluster` + weft installed).
//!
//! Builds (first time; cached) the network-only `e2e.test`, agnhost, CoreDNS and the images the
//! tests run (`tests/e2e/build.sh`), imports into every node the images it lacks, applies the
//! cluster DNS (`tests/e2e/coredns.yaml`) when the `kube-dns` Service is missing, waits for every
//! node and every kube-system pod to be Ready, then runs the suite with the lab's kubeconfig,
//! streaming its output (also kept in `<report dir>/e2e.log`) and reading the JUnit report it
//! writes (`<report dir>/junit_01.xml`) for the closing `N passed, N failed, N skipped` line.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cluster::Cluster;
use crate::kube_env;

/// Every `[sig-network]` test tagged `[Conformance]` (47 in v1.36.3).
pub const DEFAULT_FOCUS: &str = r"\[sig-network\].*\[Conformance\]";

/// Each archive `tests/e2e/build.sh` makes and the image name it holds.
pub const IMAGES: [(&str, &str); 5] = [
    ("agnhost", "registry.k8s.io/e2e-test-images/agnhost:2.63.0"),
    (
        "glibc-dns-testing",
        "registry.k8s.io/e2e-test-images/glibc-dns-testing:2.0.0",
    ),
    (
        "busybox",
        "registry.k8s.io/e2e-test-images/busybox:1.37.0-1",
    ),
    ("nginx", "registry.k8s.io/e2e-test-images/nginx:1.15-4"),
    ("coredns", "registry.k8s.io/coredns/coredns:v1.14.2"),
];

#[derive(Debug, Clone)]
pub struct Options {
    pub focus: String,
    pub skip: Option<String>,
    pub report_dir: PathBuf,
}

/// One test case of the JUnit report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Case {
    pub name: String,
    /// Ginkgo's state: passed, failed, skipped, pending, panicked, interrupted, timedout, ...
    pub status: String,
    /// The `<skipped message=...>` of a skipped case ("skipped" alone: filtered out by focus).
    pub skip_message: Option<String>,
    /// Seconds, as the report says.
    pub time: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub passed: usize,
    pub failed: Vec<String>,
    /// Selected by focus and skip, but skipped at run time (the test's own precondition).
    pub skipped: Vec<String>,
}

impl Summary {
    pub fn line(&self) -> String {
        format!(
            "{} passed, {} failed, {} skipped",
            self.passed,
            self.failed.len(),
            self.skipped.len()
        )
    }
}

/// Runs the suite against the cluster in `lab_dir`; returns the summary of its JUnit report.
pub fn run(lab_dir: &Path, opts: &Options) -> Result<Summary> {
    let cluster = Cluster::load(lab_dir)?.context(
        "no lab cluster here: start one with `weft-lab up --cluster` (same WEFT_LAB_DIR)",
    )?;
    let kubectl = kube_env::binaries()?.join("kubectl");
    let e2e = kube_env::script_dir("e2e/build.sh", Vec::<&str>::new())?;
    let k = |args: &[&str]| -> Result<(bool, String)> {
        let out = Command::new(&kubectl)
            .args(args)
            .env("KUBECONFIG", &cluster.kubeconfig)
            .output()
            .context("running kubectl")?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        ))
    };

    import_images(&cluster, &e2e.join("images"))?;

    let (ok, out) = k(&[
        "wait",
        "--for=condition=Ready",
        "node",
        "--all",
        "--timeout=120s",
    ])?;
    if !ok {
        bail!("not every node is Ready (is weft installed? kubectl apply -f deploy/weft.yaml):\n{out}");
    }
    let (has_dns, _) = k(&["-n", "kube-system", "get", "service", "kube-dns"])?;
    if !has_dns {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("e2e/coredns.yaml");
        eprintln!("e2e: applying {}", manifest.display());
        let (ok, out) = k(&["apply", "-f", &manifest.to_string_lossy()])?;
        if !ok {
            bail!("kubectl apply -f {}: {out}", manifest.display());
        }
    }
    wait_kube_system_ready(&k, Duration::from_secs(180))?;

    std::fs::create_dir_all(&opts.report_dir)
        .with_context(|| format!("creating {}", opts.report_dir.display()))?;
    let junit = opts.report_dir.join("junit_01.xml");
    let _ = std::fs::remove_file(&junit);
    let log_path = opts.report_dir.join("e2e.log");
    let mut args = vec![
        "--provider=local".to_string(),
        format!("--kubeconfig={}", cluster.kubeconfig.display()),
        format!("--kubectl-path={}", kubectl.display()),
        format!("--report-dir={}", opts.report_dir.display()),
        format!("--e2e-output-dir={}", opts.report_dir.display()),
        // No cluster/log-dump scripts here; the lab's logs are in its dir.
        "--disable-log-dump=true".into(),
        "--dump-logs-on-failure=false".into(),
        format!("--ginkgo.focus={}", opts.focus),
        "--ginkgo.no-color".into(),
        // Ginkgo's default suite timeout is 1 h; the 47 run one after the other.
        "--ginkgo.timeout=3h".into(),
    ];
    if let Some(skip) = &opts.skip {
        args.push(format!("--ginkgo.skip={skip}"));
    }
    eprintln!(
        "e2e: {} {}\ne2e: full output in {}",
        e2e.join("bin/e2e.test").display(),
        args.join(" "),
        log_path.display()
    );
    let t0 = Instant::now();
    let status = stream(
        Command::new(e2e.join("bin/e2e.test"))
            .args(&args)
            .env("KUBECONFIG", &cluster.kubeconfig)
            .current_dir(&opts.report_dir),
        &log_path,
    )?;
    eprintln!(
        "e2e: e2e.test exited ({status}) after {:.0} s; JUnit report {}",
        t0.elapsed().as_secs_f64(),
        junit.display()
    );
    let xml = std::fs::read_to_string(&junit).with_context(|| {
        format!(
            "e2e.test wrote no JUnit report ({status}); see {}",
            log_path.display()
        )
    })?;
    let cases = parse_junit(&xml);
    let table = opts.report_dir.join("results.md");
    std::fs::write(&table, results_table(&cases))
        .with_context(|| format!("writing {}", table.display()))?;
    eprintln!(
        "e2e: result table (test, result, time) in {}",
        table.display()
    );
    let summary = summarize(&cases);
    if summary.failed.is_empty() && summary.passed == 0 && !status.success() {
        bail!(
            "e2e.test failed ({status}) and ran no test; see {}",
            log_path.display()
        );
    }
    Ok(summary)
}

/// Imports into every node the e2e images it does not have yet.
fn import_images(cluster: &Cluster, images: &Path) -> Result<()> {
    let cluster_dir = kube_env::script_dir("cluster/build.sh", Vec::<&str>::new())?;
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = cluster
            .nodes
            .iter()
            .map(|node| {
                let cluster_dir = &cluster_dir;
                s.spawn(move || -> Result<()> {
                    let have = node.image_names(cluster_dir)?;
                    let tars: Vec<PathBuf> = IMAGES
                        .iter()
                        .filter(|(_, name)| !have.iter().any(|h| h == name))
                        .map(|(file, _)| images.join(format!("{file}.tar")))
                        .collect();
                    if !tars.is_empty() {
                        eprintln!("e2e: importing {} image(s) on {}", tars.len(), node.name);
                        node.import_images(cluster_dir, &tars)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("an image import thread panicked"))??;
        }
        Ok(())
    })
}

/// Runs kubectl with some arguments: (success, stdout + stderr).
type Kubectl<'a> = &'a dyn Fn(&[&str]) -> Result<(bool, String)>;

/// Waits until kube-system has pods and all of them are Ready (the suite checks this first).
fn wait_kube_system_ready(k: Kubectl<'_>, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let (ok, out) = k(&[
            "-n",
            "kube-system",
            "get",
            "pods",
            "-o",
            r#"jsonpath={range .items[*]}{.metadata.name} {.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}"#,
        ])?;
        let pods: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
        let not_ready: Vec<&str> = pods
            .iter()
            .copied()
            .filter(|l| !l.ends_with(" True"))
            .collect();
        if ok && !pods.is_empty() && not_ready.is_empty() {
            eprintln!("e2e: kube-system: {} pod(s) Ready", pods.len());
            return Ok(());
        }
        if Instant::now() > deadline {
            let (_, detail) = k(&["-n", "kube-system", "get", "pods", "-o", "wide"])?;
            bail!("kube-system pods not Ready after {timeout:?}: {not_ready:?}\n{detail}");
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// Runs `cmd` with stdout and stderr copied, as they come, to ours and to `log`.
fn stream(cmd: &mut Command, log: &Path) -> Result<std::process::ExitStatus> {
    let file = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting e2e.test")?;
    let out = child.stdout.take().context("no stdout")?;
    let err = child.stderr.take().context("no stderr")?;
    let file = std::sync::Arc::new(std::sync::Mutex::new(file));
    let copy = |mut from: Box<dyn Read + Send>,
                to_err: bool,
                file: std::sync::Arc<std::sync::Mutex<std::fs::File>>| {
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = from.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if to_err {
                    let _ = std::io::stderr().write_all(&buf[..n]);
                } else {
                    let mut o = std::io::stdout().lock();
                    let _ = o.write_all(&buf[..n]);
                    let _ = o.flush();
                }
                if let Ok(mut f) = file.lock() {
                    let _ = f.write_all(&buf[..n]);
                }
            }
        })
    };
    let a = copy(Box::new(out), false, file.clone());
    let b = copy(Box::new(err), true, file);
    let status = child.wait().context("waiting for e2e.test")?;
    let _ = a.join();
    let _ = b.join();
    Ok(status)
}

/// The value of attribute `name` in a start tag's text.
fn attr(tag: &str, name: &str) -> Option<String> {
    let key = format!(" {name}=\"");
    let start = tag.find(&key)? + key.len();
    let end = tag[start..].find('"')? + start;
    Some(unescape(&tag[start..end]))
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&apos;", "'")
        .replace("&#xA;", "\n")
        .replace("&amp;", "&")
}

/// The test cases of a Ginkgo JUnit report (only what the summary needs).
pub fn parse_junit(xml: &str) -> Vec<Case> {
    let mut cases = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find("<testcase ") {
        rest = &rest[i..];
        let tag_end = rest.find('>').unwrap_or(rest.len());
        let tag = &rest[..tag_end];
        let self_closing = tag.ends_with('/');
        let body_end = if self_closing {
            tag_end
        } else {
            rest.find("</testcase>").unwrap_or(rest.len())
        };
        let body = &rest[tag_end..body_end];
        let skip_message = body.find("<skipped").map(|j| {
            let t = &body[j..];
            let t = &t[..t.find('>').unwrap_or(t.len())];
            attr(t, "message").unwrap_or_default()
        });
        cases.push(Case {
            name: attr(tag, "name").unwrap_or_default(),
            status: attr(tag, "status").unwrap_or_default(),
            skip_message,
            time: attr(tag, "time").unwrap_or_default(),
        });
        rest = &rest[body_end.max(1)..];
    }
    cases
}

/// The tests that ran (not those filtered out), as a Markdown table: test, result, seconds.
pub fn results_table(cases: &[Case]) -> String {
    let mut out = String::from("| test | result | time (s) |\n| --- | --- | ---: |\n");
    for c in cases {
        let Some(name) = c.name.strip_prefix("[It] ") else {
            continue;
        };
        if c.status == "skipped" && c.skip_message.as_deref().is_none_or(|m| m == "skipped") {
            continue;
        }
        out += &format!(
            "| {} | {} | {} |\n",
            name.replace('|', "\\|"),
            c.status,
            c.time
                .parse::<f64>()
                .map_or(c.time.clone(), |t| format!("{t:.1}"))
        );
    }
    out
}

/// Counts the report's tests (`[It] <full name>`; the name is kept without `[It] `): suite
/// nodes (`[SynchronizedBeforeSuite]`, `[ReportAfterSuite] ...`) count only when they fail;
/// skipped cases only when skipped at run time (a filtered-out spec's message is just "skipped").
pub fn summarize(cases: &[Case]) -> Summary {
    let mut s = Summary::default();
    for c in cases {
        let (test, name) = match c.name.strip_prefix("[It] ") {
            Some(n) => (true, n.to_string()),
            None => (false, c.name.clone()),
        };
        match c.status.as_str() {
            "passed" if test => s.passed += 1,
            "passed" => {}
            "skipped" | "pending" => {
                let msg = c.skip_message.as_deref().unwrap_or("skipped");
                if test && msg != "skipped" {
                    s.skipped.push(format!("{name} ({msg})"));
                }
            }
            _ => s.failed.push(name),
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
  <testsuites tests="4" disabled="0" errors="0" failures="1" time="10">
      <testsuite name="Kubernetes e2e suite" package="/x" tests="4">
          <testcase name="[SynchronizedBeforeSuite]" classname="Kubernetes e2e suite" status="passed" time="1"></testcase>
          <testcase name="[It] [sig-network] DNS should provide DNS for services  [Conformance]" classname="Kubernetes e2e suite" status="passed" time="3"></testcase>
          <testcase name="[It] [sig-network] Services should serve a basic endpoint from pods  [Conformance]" classname="Kubernetes e2e suite" status="failed" time="5">
              <failure type="failed">[FAILED] timed out &amp; more</failure>
          </testcase>
          <testcase name="[It] [sig-network] HostPort validates [LinuxOnly] [Conformance]" classname="Kubernetes e2e suite" status="skipped" time="0">
              <skipped message="skipped - Only supported for node OS distro [gci ubuntu]"></skipped>
          </testcase>
          <testcase name="[It] [sig-apps] Deployment not selected" classname="Kubernetes e2e suite" status="skipped" time="0">
              <skipped message="skipped"></skipped>
          </testcase>
          <testcase name="[ReportAfterSuite] Kubernetes e2e suite report" classname="Kubernetes e2e suite" status="passed" time="0"></testcase>
      </testsuite>
  </testsuites>"#;

    #[test]
    fn junit_cases_and_summary() {
        let cases = parse_junit(REPORT);
        assert_eq!(cases.len(), 6);
        assert_eq!(cases[2].status, "failed");
        assert_eq!(cases[4].skip_message.as_deref(), Some("skipped"));
        let s = summarize(&cases);
        assert_eq!(s.passed, 1);
        assert_eq!(
            s.failed,
            vec!["[sig-network] Services should serve a basic endpoint from pods  [Conformance]"]
        );
        assert_eq!(s.skipped.len(), 1);
        assert_eq!(s.line(), "1 passed, 1 failed, 1 skipped");
        let table = results_table(&cases);
        assert_eq!(table.lines().count(), 2 + 3, "{table}");
        assert!(
            table.contains(
                "| [sig-network] DNS should provide DNS for services  [Conformance] | passed | 3.0 |"
            ),
            "{table}"
        );
    }

    #[test]
    fn a_failed_suite_setup_counts_as_a_failure() {
        let cases = vec![Case {
            name: "[SynchronizedBeforeSuite]".into(),
            status: "failed".into(),
            skip_message: None,
            time: "0".into(),
        }];
        assert_eq!(summarize(&cases).line(), "0 passed, 1 failed, 0 skipped");
    }

    #[test]
    fn every_image_is_one_the_suite_pins() {
        for (_, name) in IMAGES {
            assert!(name.starts_with("registry.k8s.io/"), "{name}");
        }
    }
}
