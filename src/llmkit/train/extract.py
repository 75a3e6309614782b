"""Main content of a web page as text or Markdown, through resiliparse's extractor.

resiliparse (the extractor of the DCLM and Dolma pipelines) was chosen over trafilatura and
inscriptis by ``bench/prepare_bench.py --extractors`` on pages shaped like real sites: it kept the
main content of every page (trafilatura lost the replies of a forum thread), kept every line of
every code block (trafilatura dropped blank lines and split inline code onto lines of its own;
inscriptis keeps the page layout but removes no boilerplate at all), and it is the fastest of the
three. Its main-content heuristics leave a few kinds of page furniture in place (overlays and
dialogs, advertising slots, line-number gutters of highlighted code): ``SKIP`` removes those
before extraction.

resiliparse writes no Markdown; ``to_markdown`` turns its reduced HTML (headings, paragraphs,
lists, ``<pre>``) into Markdown, with code fenced and left byte for byte as the page had it.
"""

from __future__ import annotations

import html as html_lib
import re

FORMATS = ("text", "markdown")

# CSS selectors of page furniture that resiliparse's main-content heuristics keep: dialogs, popups
# and overlays (cookie consent, keyboard-help panels, newsletter modals), advertising slots, and the
# line-number columns that highlighters put beside code.
SKIP = [
    '[role="dialog"]', '[role="alertdialog"]', '[aria-modal="true"]', '[aria-hidden="true"]',
    '[id*="popup"]', '[class*="popup"]', '[class*="modal"]', '[id*="overlay"]', '[class*="overlay"]',
    '[id*="cookie"]', '[class*="cookie"]', '[id*="consent"]', '[class*="consent"]',
    '[class*="ad-slot"]', '[class*="advert"]', '[id*="advert"]', '[data-ad-unit]', '[data-ad-slot]',
    '.linenos', '.linenodiv', '.lineno', 'td.gutter', '.hljs-ln-numbers',
]


def html_to_text(page: str, format: str = "text") -> str:
    """The main content of an HTML page: navigation, menus, sidebars, overlays, cookie banners and
    footers dropped; headings, paragraphs, lists and tables kept as readable text; ``<pre>``
    blocks kept line for line with their indentation. ``format="markdown"`` marks headings,
    lists and fenced code the Markdown way."""
    from resiliparse.extract.html2text import extract_plain_text

    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    options = dict(main_content=True, alt_texts=False, links=False, list_bullets=True, comments=True,
                   form_fields=False, noscript=False, skip_elements=SKIP)
    if format == "text":
        return extract_plain_text(page, preserve_formatting=True, **options).strip()
    return to_markdown(extract_plain_text(page, preserve_formatting="minimal_html", **options))


# ------------------------------------------------------------------ reduced HTML -> Markdown

_TAG = re.compile(r"<(/?)(h[1-6]|p|pre|ul|ol|li|br)>", re.IGNORECASE)


def to_markdown(reduced: str) -> str:
    """resiliparse's reduced HTML (``<h1>``-``<h6>``, ``<p>``, ``<br>``, ``<ul>``/``<ol>``/``<li>``,
    ``<pre>``; everything else plain text with entities escaped) as Markdown. The reduced form has
    no attributes and no other tags, so a scan over its tags is enough: no HTML parser needed."""
    out: list[str] = []
    lists: list[list[int]] = []  # per open list: [numbered?, items so far]
    inline = 0  # inside a heading, paragraph or list item: text runs on; outside it is a block
    pre_depth, pre_start, at = 0, 0, 0
    for m in _TAG.finditer(reduced):
        text, at = reduced[at : m.start()], m.end()
        closing, tag = m.group(1) == "/", m.group(2).lower()
        if pre_depth:  # inside code: only a <pre> tag matters (pages nest them)
            if tag == "pre":
                pre_depth += -1 if closing else 1
                if pre_depth == 0:
                    code = html_lib.unescape(_TAG.sub("", reduced[pre_start : m.start()]))
                    out.append("\n\n```\n" + code.rstrip("\n") + "\n```\n\n")
            continue
        out.append(_text(text, inline))
        if tag == "pre":
            pre_depth, pre_start = (1, m.end()) if not closing else (0, 0)
        elif tag == "br":
            out.append("\n")
        elif tag in ("ul", "ol"):
            if not closing:
                lists.append([tag == "ol", 0])
            elif lists:
                lists.pop()
            out.append("" if lists else "\n")  # a nested list goes on from its item's line
        else:  # h1-h6, p, li
            inline = max(0, inline + (-1 if closing else 1))
            if closing:
                out.append("\n\n" if tag != "li" else "")
            elif tag == "p":
                out.append("\n\n")
            elif tag == "li":
                numbered, count = lists[-1] if lists else (False, 0)
                if lists:
                    lists[-1][1] += 1
                out.append("\n" + "  " * max(0, len(lists) - 1) + (f"{count + 1}. " if numbered else "- "))
            else:
                out.append("\n\n" + "#" * int(tag[1]) + " ")
    out.append(_text(reduced[at:], inline))
    text = re.sub(r"[ \t]+\n", "\n", "".join(out))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _text(chunk: str, inline: int) -> str:
    """Text between two tags, entities decoded; the layout whitespace around it dropped. Text
    outside any paragraph, heading or list item (a table's rows) becomes a block of its own."""
    chunk = html_lib.unescape(chunk).strip()
    return chunk if not chunk or inline else "\n\n" + chunk + "\n\n"
