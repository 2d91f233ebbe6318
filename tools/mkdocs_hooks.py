"""MkDocs hook for the notebook pages: the table of contents links the headings as the page renders them.

mkdocs-jupyter gives each heading an id from its full text (inline code included, as Quarto and nbdev's doc links do:
`What an \`x\` value becomes` -> `what-an-x-value-becomes`), but builds the table of contents with Python-Markdown,
which leaves inline code out of the slug and numbers repeats (`_1`). Here repeated ids are numbered in the page and
the table of contents takes the page's ids, in order.
"""
import re

_HEAD = re.compile(r'<h([1-6])([^>]*?)\sid="([^"]+)"(.*?)</h\1>', re.S)


def _flat(items):
    for it in items:
        yield it
        yield from _flat(it.children)


def on_page_content(html, page, config, files):
    if not page.file.src_uri.endswith('.ipynb'): return html
    seen, ids = {}, []
    def number(m):
        level, attrs, hid, inner = m.groups()
        n = seen[hid] = seen.get(hid, -1) + 1
        new = hid if n == 0 else f"{hid}_{n}"
        ids.append((int(level), new))
        inner = inner.replace(f'href="#{hid}"', f'href="#{new}"')  # the heading's own ¶ link
        return f'<h{level}{attrs} id="{new}"{inner}</h{level}>'
    html = _HEAD.sub(number, html)
    items = list(_flat(page.toc))
    heads = [h for h in ids if h[0] <= max((it.level for it in items), default=0)]
    if [it.level for it in items] == [lvl for lvl, _ in heads]:  # the same headings: relink them in order
        for it, (_, hid) in zip(items, heads): it.id = hid
    return html
