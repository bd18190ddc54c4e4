// Drive the tracetrain dashboard in headless Debian chromium (playwright-core, no browser download).
// Env: UI_URL (http://127.0.0.1:PORT/ui/), UI_TOKEN, CHROMIUM (binary), ARTIFACTS_DIR (screenshots),
// EXPECT (JSON: {episodes, service, service_episodes, episode, spans_stored}).
// Prints one JSON line of what it saw; exits 1 with a message on the first thing that is wrong.
"use strict";

const path = require("node:path");
const fs = require("node:fs");
const { chromium } = require("playwright-core");

const url = process.env.UI_URL;
const expect = JSON.parse(process.env.EXPECT);
const artifacts = process.env.ARTIFACTS_DIR;
const seen = { screenshots: [], foreign_requests: [], page_errors: [], console_errors: [] };
let loggedIn = false;  // before the token, the 401 itself is logged as a console error

function check(condition, message) {
  if (!condition) throw new Error(message);
}

async function shot(page, name) {
  const file = path.join(artifacts, name + ".png");
  await page.screenshot({ path: file, fullPage: true });
  seen.screenshots.push(file);
}

async function main() {
  fs.mkdirSync(artifacts, { recursive: true });
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM, headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],  // root in a container
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
    const origin = new URL(url).origin;
    page.on("request", (r) => { if (!r.url().startsWith(origin)) seen.foreign_requests.push(r.url()); });
    page.on("pageerror", (e) => seen.page_errors.push(String(e)));
    // Failed loads are checked through their responses (console events may arrive after the login).
    page.on("console", (m) => {
      if (loggedIn && m.type() === "error" && !m.text().startsWith("Failed to load resource")) seen.console_errors.push(m.text());
    });
    page.on("response", (r) => { if (loggedIn && r.status() >= 400) seen.console_errors.push(`${r.status()} ${r.url()}`); });

    // 1. No token: the 401 page is a form and shows no data; the token opens the episode list.
    const first = await page.goto(url);
    seen.login_status = first.status();
    check(await page.locator("form#login").count() === 1, "no token form on the 401 page");
    seen.login_page_has_data = (await page.content()).includes(expect.episode);
    await shot(page, "01-login");
    await page.fill("#token", process.env.UI_TOKEN);
    await page.click("form#login button");
    await page.waitForSelector("tr.episode-row", { timeout: 20000 });
    loggedIn = true;
    seen.all_rows = await page.locator("tr.episode-row").count();
    seen.all_episode_ids = await page.locator("tr.episode-row").evaluateAll((rows) => rows.map((r) => r.dataset.episode));
    seen.total_text = await page.locator("#episode-total").innerText();
    await shot(page, "02-episodes");

    // 2. A filter narrows the list.
    await page.selectOption("select[name=service]", expect.service);
    await page.waitForFunction((n) => document.querySelectorAll("tr.episode-row").length === n,
      expect.service_episodes, { timeout: 20000 });
    seen.filtered_rows = await page.locator("tr.episode-row").count();
    seen.filtered_services = await page.locator("tr.episode-row td:nth-child(2)").allInnerTexts();
    await shot(page, "03-episodes-filtered");

    // 3. Clicking an episode opens its waterfall with its rewards (delayed one included).
    await page.click(`tr.episode-row[data-episode="${expect.episode}"]`);
    await page.waitForSelector("#waterfall .span-row", { timeout: 20000 });
    seen.waterfall_spans = await page.locator("#waterfall .span-row").count();
    seen.bar_widths_px = await page.locator("#waterfall .span-bar").evaluateAll((b) => b.map((x) => x.offsetWidth));
    seen.track_width_px = await page.locator("#waterfall .span-track").first().evaluate((t) => t.offsetWidth);
    seen.span_names = await page.locator("#waterfall .span-name").allInnerTexts();
    seen.reward_rows = await page.locator("#rewards tr.reward-row").allInnerTexts();
    await shot(page, "04-trace-waterfall");

    // 4. The LLM call: messages, token ids with logprobs, low-probability tokens highlighted.
    await page.click("#waterfall .span-row.llm-row");
    await page.waitForSelector("#span-detail .token", { timeout: 20000 });
    const ids = (tokens) => tokens.map((t) => t.dataset.id);
    seen.response_tokens = await page.locator("#span-detail .token-details[open] .token").evaluateAll(ids);
    seen.low_tokens = await page.locator("#span-detail .token.low").evaluateAll(ids);
    seen.detail_text = await page.locator("#span-detail").innerText();
    await shot(page, "05-llm-call");

    // 5. Training curves and 6. ingestion health.
    await page.click("nav a[data-page=training]");
    await page.waitForSelector("#training-charts svg.chart", { timeout: 20000 });
    seen.chart_titles = await page.locator("#training-charts svg.chart").evaluateAll((c) => c.map((s) => s.dataset.title));
    seen.drawn_series = await page.locator("#training-charts svg.chart path.series").evaluateAll(
      (p) => p.filter((x) => (x.getAttribute("d") || "").length > 10).length);
    seen.checkpoint_rows = await page.locator("#checkpoints tbody tr").count();
    await shot(page, "06-training");

    await page.click("nav a[data-page=health]");
    await page.waitForSelector("#health-cards", { timeout: 20000 });
    seen.spans_accepted_card = await page.locator("#spans-accepted .value").innerText();
    seen.storage_card = await page.locator("#storage .value").innerText();
    await shot(page, "07-health");
  } finally {
    await browser.close();
  }
  process.stdout.write(JSON.stringify(seen) + "\n");
}

main().catch((error) => {
  process.stdout.write(JSON.stringify(seen) + "\n");
  process.stderr.write("dashboard check failed: " + (error.stack || error) + "\n");
  process.exit(1);
});
