// Drives the api's sign-in demo page (/demo, DEMO_PAGE=true) in Debian's Chromium: an invalid
// number, a code read from fake-sms, a wrong code, the right one, /v1/me, refresh, log out.
// tests/tests/browser.rs runs it against the real api, sms-worker and fake-sms; by hand:
//   API_URL=http://127.0.0.1:8080 SMS_URL=http://127.0.0.1:9099 PHONE=+14152345678 \
//   SCREENSHOT=screenshots/demo.png node demo.mjs
// Exits 0 when every step held, non-zero with the reason otherwise.

import { mkdir, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { chromium } from "playwright-core";

const STEP_TIMEOUT = 15_000;
const WHOLE_RUN = 80_000;

function required(name) {
  const value = process.env[name];
  if (!value) fail(`${name} is not set (see the comment at the top of demo.mjs)`);
  return value;
}

function fail(message) {
  console.error(`demo.mjs: FAILED: ${message}`);
  process.exit(1);
}

function check(condition, message) {
  if (!condition) throw new Error(message);
}

const apiUrl = required("API_URL").replace(/\/$/, "");
const smsUrl = required("SMS_URL").replace(/\/$/, "");
const phone = required("PHONE");
const screenshot = required("SCREENSHOT");
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
const apiHost = new URL(apiUrl).host;

// However a step hangs, the run ends.
setTimeout(() => fail(`the run took longer than ${WHOLE_RUN / 1000} s`), WHOLE_RUN).unref();

let step = "starting";
const log = (text) => {
  step = text;
  console.log(`demo.mjs: ${text}`);
};

// The api's own answer, asked for outside the browser, to compare with what the page shows.
async function problemDetail(path, body) {
  const response = await fetch(apiUrl + path, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  const problem = await response.json();
  check(!response.ok, `${path} accepted ${JSON.stringify(body)}`);
  check(
    (response.headers.get("content-type") || "").startsWith("application/problem+json"),
    `${path} answered ${response.headers.get("content-type")}, not problem+json`,
  );
  check(typeof problem.detail === "string" && problem.detail, `no detail in ${JSON.stringify(problem)}`);
  return problem.detail;
}

// The code fake-sms received for `phone`: the first run of 4 to 10 digits of the newest SMS.
async function codeFromFakeSms() {
  const deadline = Date.now() + STEP_TIMEOUT;
  let seen = "nothing";
  while (Date.now() < deadline) {
    const response = await fetch(`${smsUrl}/messages?to=${encodeURIComponent(phone)}`);
    if (response.ok) {
      const messages = await response.json();
      seen = JSON.stringify(messages);
      const body = messages.length ? messages[messages.length - 1].body : "";
      const code = (body.match(/\d+/g) || []).find((run) => run.length >= 4 && run.length <= 10);
      if (code) return code;
    }
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
  throw new Error(`no SMS with a code reached fake-sms for ${phone} within ${STEP_TIMEOUT / 1000} s (saw ${seen})`);
}

const profile = await mkdtemp(join(tmpdir(), "otp-auth-chromium-"));
let context;
const requests = [];
const failedRequests = [];
const consoleErrors = [];
const pageErrors = [];
const shown = (errors) => errors.map(({ text, url }) => `${text} [${url}]`).join("; ");
// Chromium logs each 4xx answer as a console error. Two kinds are expected: the page has no
// icon, so the browser's own GET /favicon.ico is a 404 (the CSP's img-src 'self' forbids the
// usual `<link rel="icon" href="data:,">`); and the API's refusals this run asks for (the
// invalid number, the wrong code, the old token after logging out). Anything else (a CSP
// violation, a script error, a 5xx) is not.
const is4xx = (text) => /^Failed to load resource: the server responded with a status of 4\d\d/.test(text);
const favicon404 = ({ text, url }) => is4xx(text) && new URL(url).pathname === "/favicon.ico";
const apiRefusal = ({ text, url }) => is4xx(text) && new URL(url).pathname.startsWith("/v1/");

try {
  log(`launching ${executablePath}`);
  context = await chromium.launchPersistentContext(profile, {
    executablePath,
    headless: true,
    timeout: 30_000,
    viewport: { width: 800, height: 900 },
    // Nothing may reach Google (or anything but the api): this machine, and CI, have no internet.
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
  const page = context.pages()[0] ?? (await context.newPage());
  const cdp = await context.newCDPSession(page);
  console.log(`demo.mjs: ${(await cdp.send("Browser.getVersion")).product}`);
  await cdp.detach();
  page.setDefaultTimeout(STEP_TIMEOUT);
  page.on("request", (request) => requests.push(request.url()));
  page.on("requestfailed", (request) =>
    failedRequests.push(`${request.method()} ${request.url()}: ${request.failure()?.errorText}`),
  );
  page.on("console", (message) => {
    if (message.type() === "error") consoleErrors.push({ text: message.text(), url: message.location().url });
  });
  page.on("pageerror", (error) => pageErrors.push(String(error)));
  const byTestId = (id) => page.locator(`[data-testid=${id}]`);
  const errorText = async () => (await byTestId("error").textContent()).trim();

  log(`opening ${apiUrl}/demo`);
  const response = await page.goto(`${apiUrl}/demo`, { waitUntil: "load" });
  check(response && response.status() === 200, `/demo answered ${response?.status()}`);
  await byTestId("phone-form").waitFor({ state: "visible" });
  // The icon is asked for after the load: give it a moment, so a wrong answer shows here.
  await page.waitForTimeout(300);
  const onLoad = consoleErrors.filter((error) => !favicon404(error));
  check(onLoad.length === 0, `console errors while loading the page: ${shown(onLoad)}`);
  check(pageErrors.length === 0, `uncaught errors while loading the page: ${pageErrors.join("; ")}`);
  check(failedRequests.length === 0, `failed requests while loading: ${failedRequests.join("; ")}`);

  log("an invalid number shows the api's problem detail");
  const invalid = "12345";
  const expected = await problemDetail("/v1/otp", { phone_number: invalid });
  await byTestId("phone").fill(invalid);
  await byTestId("send").click();
  await page.waitForFunction(
    () => document.querySelector("[data-testid=error]").textContent.trim() !== "",
    null,
    { timeout: STEP_TIMEOUT },
  );
  check((await errorText()) === expected, `the page shows "${await errorText()}", the api said "${expected}"`);
  check(await byTestId("phone-form").isVisible(), "the phone form is gone after an error");

  log(`sending a code to ${phone}`);
  await byTestId("phone").fill(phone);
  await byTestId("send").click();
  await byTestId("code-form").waitFor({ state: "visible" });
  check((await errorText()) === "", `the error stayed: "${await errorText()}"`);
  const autocomplete = await byTestId("code").getAttribute("autocomplete");
  check(autocomplete === "one-time-code", `the code input has autocomplete="${autocomplete}"`);
  const sentTo = await byTestId("sent-to").textContent();
  check(sentTo.includes(phone), `"sent-to" does not name ${phone}: "${sentTo}"`);

  log("reading the code from fake-sms");
  const code = await codeFromFakeSms();

  log("a wrong code shows the api's problem detail");
  const wrong = [...code].map((digit) => String((Number(digit) + 1) % 10)).join("");
  await byTestId("code").fill(wrong);
  await byTestId("verify").click();
  await page.waitForFunction(
    () => document.querySelector("[data-testid=error]").textContent.trim() !== "",
    null,
    { timeout: STEP_TIMEOUT },
  );
  check((await errorText()).includes("the OTP is wrong"), `a wrong code shows "${await errorText()}"`);
  check(await byTestId("code-form").isVisible(), "the code form is gone after a wrong code");

  log("signing in with the right code");
  await byTestId("code").fill(code);
  await byTestId("verify").click();
  await byTestId("signed-in").waitFor({ state: "visible" });
  check((await errorText()) === "", `an error after signing in: "${await errorText()}"`);
  const me = JSON.parse(await byTestId("me").textContent());
  check(me.phone_number === phone, `/v1/me shows ${JSON.stringify(me)}, not ${phone}`);
  check(
    (await byTestId("new-user").textContent()).includes("new account"),
    "a fresh number is not welcomed as a new account",
  );

  log("refreshing the session");
  await byTestId("refresh").click();
  await page.waitForFunction(
    () => document.querySelector("[data-testid=status]").textContent.includes("refreshed"),
    null,
    { timeout: STEP_TIMEOUT },
  );
  check((await errorText()) === "", `an error after refreshing: "${await errorText()}"`);
  check(await byTestId("signed-in").isVisible(), "signed out by a refresh");
  const meAgain = JSON.parse(await byTestId("me").textContent());
  check(meAgain.phone_number === phone, `/v1/me after refreshing shows ${JSON.stringify(meAgain)}`);

  log(`screenshot to ${screenshot}`);
  await mkdir(dirname(screenshot), { recursive: true });
  await page.screenshot({ path: screenshot, fullPage: true });

  log("logging out");
  await byTestId("logout").click();
  await page.waitForFunction(
    () => document.querySelector("[data-testid=status]").textContent.startsWith("Logged out"),
    null,
    { timeout: STEP_TIMEOUT },
  );
  const status = await byTestId("status").textContent();
  check(status.includes("the old token is refused"), `after logging out the status says "${status}"`);
  check(await byTestId("phone-form").isVisible(), "the phone form is not back after logging out");
  check(!(await byTestId("signed-in").isVisible()), "still shown as signed in after logging out");

  log("checking what the browser asked for");
  const elsewhere = requests.filter((url) => new URL(url).host !== apiHost);
  check(elsewhere.length === 0, `requests to other hosts than ${apiHost}: ${elsewhere.join(", ")}`);
  check(failedRequests.length === 0, `failed requests: ${failedRequests.join("; ")}`);
  check(pageErrors.length === 0, `uncaught errors in the page: ${pageErrors.join("; ")}`);
  const unexpected = consoleErrors.filter((error) => !favicon404(error) && !apiRefusal(error));
  check(unexpected.length === 0, `console errors: ${shown(unexpected)}`);
  console.log(
    `demo.mjs: ok: ${requests.length} requests, all to ${apiHost}, none failed; ` +
      `console errors: only the ${consoleErrors.length} expected 4xx answers`,
  );
} catch (error) {
  const detail = [
    `while ${step}: ${error.message}`,
    `requests: ${requests.join(", ") || "none"}`,
    failedRequests.length ? `failed requests: ${failedRequests.join("; ")}` : "",
    consoleErrors.length ? `console errors: ${shown(consoleErrors)}` : "",
    pageErrors.length ? `page errors: ${pageErrors.join("; ")}` : "",
  ];
  await context?.close().catch(() => {});
  await rm(profile, { recursive: true, force: true }).catch(() => {});
  fail(detail.filter(Boolean).join("\n  "));
}

await context.close();
await rm(profile, { recursive: true, force: true });
