// Follows one release on turnout's release page in headless chromium, as a person would watch it:
//
//   node hack/browser/release-page.mjs URL NAMESPACE/DEPLOYMENT OUT_DIR
//
// 1. opens URL (the page at /releases) and waits for the release's row, in flight, with traffic on its
//    candidate (prints `seen {...}`);
// 2. waits until the page shows other weights, without reloading (prints `moved {...}`);
// 3. waits until the chart draws requests for at least two versions and the analysis table shows a
//    measured value (prints `charted {...}`);
// 4. keeps screenshots of the page and of its chart in OUT_DIR, and prints `done {...}`.
//
// Every wait has a deadline; a missed one exits 1 with what the page showed, after a screenshot.
// Chromium is Debian's (CHROMIUM, default /usr/bin/chromium), started without network services that
// would try to reach the internet.
import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";
import { join } from "node:path";

const [url, release, outDir] = process.argv.slice(2);
if (!url || !release || !outDir) {
  console.error("usage: node release-page.mjs URL NAMESPACE/DEPLOYMENT OUT_DIR");
  process.exit(2);
}
mkdirSync(outDir, { recursive: true });
const deadline = Number(process.env.PAGE_DEADLINE_MS || 120000);

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"],
});
const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
const errors = [];
page.on("pageerror", e => errors.push(String(e)));
page.on("console", m => { if (m.type() === "error") errors.push(m.text()); });

// What the page shows of the release now.
async function shown() {
  return page.evaluate(key => {
    const row = document.querySelector(`tr[data-release="${key}"]`);
    const weights = {};
    for (const w of document.querySelectorAll("#weights [data-weight-of]")) {
      weights[w.getAttribute("data-weight-of")] = parseInt(w.textContent, 10);
    }
    const charted = {};
    for (const p of document.querySelectorAll("#chart-rps path[data-version]")) {
      charted[p.getAttribute("data-version")] = Number(p.getAttribute("data-points"));
    }
    const checks = [...document.querySelectorAll("#checks tr[data-check]")].map(r =>
      [...r.children].map(c => c.textContent));
    return {
      row: row !== null,
      phase: document.querySelector("#phase")?.textContent ?? null,
      weights,
      charted,
      checks,
      events: document.querySelectorAll("#events li").length,
      status: document.querySelector("#status")?.textContent ?? "",
    };
  }, release);
}

async function until(what, ok) {
  const end = Date.now() + deadline;
  let last;
  while (Date.now() < end) {
    last = await shown();
    if (ok(last)) return last;
    await page.waitForTimeout(250);
  }
  await page.screenshot({ path: join(outDir, "release-page-failed.png"), fullPage: true });
  console.error(`timed out waiting for ${what}; the page showed ${JSON.stringify(last)}; page errors: ${JSON.stringify(errors)}`);
  await browser.close();
  process.exit(1);
}

// The candidate's subset is named `vN-canary`.
const candidateWeight = s => Object.entries(s.weights)
  .filter(([v]) => v.endsWith("-canary"))
  .reduce((sum, [, w]) => sum + w, 0);

await page.goto(`${url}#${release}`);
const inFlight = ["Pending", "Progressing", "Promoting"];
const seen = await until("the release in flight with traffic on its candidate",
  s => s.row && inFlight.includes(s.phase) && candidateWeight(s) > 0);
console.log("seen " + JSON.stringify(seen));
const moved = await until("other weights",
  s => s.row && JSON.stringify(s.weights) !== JSON.stringify(seen.weights));
console.log("moved " + JSON.stringify(moved));
const charted = await until("requests of two versions on the chart and a measured check",
  s => Object.values(s.charted).filter(n => n >= 2).length >= 2
    && s.checks.some(([, value]) => value !== "–"));
console.log("charted " + JSON.stringify(charted));
await page.screenshot({ path: join(outDir, "release-page.png"), fullPage: true });
const chart = page.locator("#chart-rps");
await chart.screenshot({ path: join(outDir, "release-chart.png") });
console.log("done " + JSON.stringify({ errors, screenshots: ["release-page.png", "release-chart.png"] }));
await browser.close();
