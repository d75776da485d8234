//! The api's sign-in demo page (`/demo`, `DEMO_PAGE=true`) in Debian's Chromium, driven by
//! Playwright (`tests/browser/demo.mjs`) through the real api, sms-worker and fake-sms: an
//! invalid number, a wrong code, a sign-in, a refresh and a log-out, with a screenshot of the
//! signed-in page.
//!
//! The setup is the test's own: it installs Debian's `chromium` (as root, with apt) and
//! `playwright-core` (npm, from tests/browser/package-lock.json) when they are missing. Where
//! Chromium or Node.js cannot be had the test says `skipped: …` and passes, unless `CI` is set:
//! CI must run it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tests::stack::Stack;

/// The whole browser run; demo.mjs gives up on its own after 80 s.
const NODE_TIMEOUT: Duration = Duration::from_secs(90);
const CHROMIUM: &str = "/usr/bin/chromium";
/// A full-page PNG of the signed-in page is tens of kilobytes; a blank one is a few.
const MIN_SCREENSHOT_BYTES: u64 = 10_000;

/// A line on stderr that shows even when the test harness captures output (it captures only
/// the print macros): a skip or a minute-long install must not pass unseen.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

struct Browser {
    chromium: PathBuf,
    node: PathBuf,
}

#[tokio::test]
async fn demo_page_signs_in_in_chromium() {
    let Some(browser) = tests::required::or_skip("the browser test", setup).await else {
        return;
    };

    let stack = Stack::start_with(&[("DEMO_PAGE", "true")], "info").await;
    let phone = random_phone();
    let screenshot = screenshot_path();
    // A screenshot left by an earlier run must not pass for this one's.
    let _ = std::fs::remove_file(&screenshot);
    println!("screenshot: {}", screenshot.display());

    let started = Instant::now();
    let run = tokio::process::Command::new(&browser.node)
        .arg("demo.mjs")
        .current_dir(browser_dir())
        .env("API_URL", &stack.api_url)
        .env("SMS_URL", &stack.sms_url)
        .env("PHONE", &phone)
        .env("SCREENSHOT", &screenshot)
        .env("CHROMIUM", &browser.chromium)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(NODE_TIMEOUT, run).await;
    let (success, report) = match output {
        Ok(Ok(output)) => (
            output.status.success(),
            format!(
                "{}\n{}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        ),
        Ok(Err(e)) => (false, format!("node did not start: {e}")),
        Err(_) => (false, format!("node demo.mjs ran over {NODE_TIMEOUT:?}")),
    };
    // The stack's programs print their logs as they are dropped by a failing test.
    assert!(success, "node demo.mjs failed for {phone}: {report}");
    println!(
        "node demo.mjs passed in {:.1} s: {report}",
        started.elapsed().as_secs_f64()
    );

    let png = std::fs::read(&screenshot)
        .unwrap_or_else(|e| panic!("no screenshot at {}: {e}", screenshot.display()));
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{} is not a PNG",
        screenshot.display()
    );
    assert!(
        png.len() as u64 >= MIN_SCREENSHOT_BYTES,
        "{} is only {} bytes: a blank page?",
        screenshot.display(),
        png.len()
    );
}

/// Chromium, Node.js and playwright-core, installed when missing and possible; `Err` says why
/// they cannot be had.
fn setup() -> Result<Browser, String> {
    let chromium = chromium()?;
    let node = find("node").ok_or("no `node` on PATH: install Node.js 20 or newer")?;
    let version = run_for_output(&node, &["--version"], None)?;
    let major: u32 = version
        .trim()
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|major| major.parse().ok())
        .ok_or_else(|| format!("`node --version` said {version:?}"))?;
    if major < 20 {
        return Err(format!(
            "playwright-core needs Node.js 20 or newer, {} is {}",
            node.display(),
            version.trim()
        ));
    }
    playwright_core()?;
    say!(
        "browser test: {}, node {}",
        run_for_output(&chromium, &["--version"], None)?.trim(),
        version.trim()
    );
    Ok(Browser { chromium, node })
}

/// Debian's Chromium, installed with apt-get when it is missing and this runs as root.
fn chromium() -> Result<PathBuf, String> {
    let path = Path::new(CHROMIUM);
    if path.exists() {
        return Ok(path.to_owned());
    }
    let apt = find("apt-get").ok_or(format!("no {CHROMIUM}, and no apt-get to install it"))?;
    let uid = run_for_output(Path::new("id"), &["-u"], None)?;
    if uid.trim() != "0" {
        return Err(format!(
            "no {CHROMIUM}; install it as root: apt-get install --no-install-recommends chromium"
        ));
    }
    say!("browser test: installing Debian's chromium with apt-get (it takes a minute or two)");
    let started = Instant::now();
    let install = [
        "install",
        "-y",
        "--no-install-recommends",
        "-o",
        "DPkg::Lock::Timeout=300",
        "chromium",
    ];
    if let Err(first) = apt_get(&apt, &install) {
        // Package lists that are missing or stale name versions the mirror no longer has.
        say!("browser test: apt-get install failed, updating the package lists: {first}");
        apt_get(&apt, &["update"])?;
        apt_get(&apt, &install)?;
    }
    say!(
        "browser test: chromium installed in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    if path.exists() {
        Ok(path.to_owned())
    } else {
        Err(format!(
            "apt-get installed chromium, but there is no {CHROMIUM}"
        ))
    }
}

fn apt_get(apt: &Path, args: &[&str]) -> Result<(), String> {
    let output = Command::new(apt)
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("apt-get does not run: {e}"))?;
    if output.status.success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&output.stdout) + String::from_utf8_lossy(&output.stderr);
    let tail: Vec<&str> = text.lines().rev().take(15).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    Err(format!(
        "apt-get {} failed ({}):\n{}",
        args.join(" "),
        output.status,
        tail.join("\n")
    ))
}

/// tests/browser/node_modules/playwright-core at the version of package-lock.json: `npm ci`
/// when it is missing or another version.
fn playwright_core() -> Result<(), String> {
    let dir = browser_dir();
    let version_in = |path: &Path, pointer: &str| -> Option<String> {
        let text = std::fs::read_to_string(path).ok()?;
        let json: serde_json::Value = serde_json::from_str(&text).ok()?;
        json.pointer(pointer)?.as_str().map(str::to_owned)
    };
    let locked = version_in(
        &dir.join("package-lock.json"),
        "/packages/node_modules~1playwright-core/version",
    );
    let installed = version_in(
        &dir.join("node_modules/playwright-core/package.json"),
        "/version",
    );
    if locked.is_some() && installed == locked {
        return Ok(());
    }
    let npm = find("npm").ok_or("no `npm` on PATH: it comes with Node.js")?;
    let args: &[&str] = if locked.is_some() {
        &["ci", "--no-audit", "--no-fund"]
    } else {
        &["install", "--no-audit", "--no-fund"]
    };
    say!(
        "browser test: npm {} in {} (playwright-core {})",
        args[0],
        dir.display(),
        locked.as_deref().unwrap_or("unlocked")
    );
    run_for_output(&npm, args, Some(&dir))?;
    Ok(())
}

/// Runs `program` and returns its stdout, or why it failed with its output.
fn run_for_output(program: &Path, args: &[&str], dir: Option<&Path>) -> Result<String, String> {
    let mut command = Command::new(program);
    command.args(args).stdin(Stdio::null());
    if let Some(dir) = dir {
        command.current_dir(dir);
    }
    let shown = format!("{} {}", program.display(), args.join(" "));
    let output = command
        .output()
        .map_err(|e| format!("`{shown}` does not run: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "`{shown}` failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `name` on PATH.
fn find(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// In the checkout `cargo test` runs in (see `tests::binaries` on clones sharing a target
/// directory).
fn browser_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
        .join("browser")
}

/// `$CARGO_TARGET_DIR/browser/demo-signed-in.png`, or the same under the target directory this
/// test binary was built in (target/<profile>/deps/browser-<hash>).
fn screenshot_path() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .filter(|dir| dir.is_absolute())
        .or_else(|| {
            let exe = std::env::current_exe().ok()?;
            Some(exe.parent()?.parent()?.parent()?.to_owned())
        })
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("browser/screenshots"));
    target.join("browser").join("demo-signed-in.png")
}

/// `+1415` and seven digits: a valid US number, outside the 555 exchange and N11 codes, fresh
/// for each run so the sign-in is a new account's.
fn random_phone() -> String {
    loop {
        let exchange = rand::random_range(200..1000u32);
        if exchange != 555 && exchange % 100 != 11 {
            return format!("+1415{exchange}{:04}", rand::random_range(0..10_000u32));
        }
    }
}
