// Light formatting of model output, built as DOM nodes: paragraphs, line breaks, bullet and
// numbered lists, **bold**, *italic*, `code` and http(s) links. Text only ever becomes text
// nodes, so whatever the model (or a tampered localStorage) says cannot run or inject markup.

const INLINE = /(`[^`\n]+`)|(\*\*[^*\n]+\*\*)|(\*[^*\n\s][^*\n]*\*)|(https?:\/\/[^\s<>"'`]*[^\s<>"'`.,;:!?)\]])/g
const BULLET = /^\s*[-*•]\s+/
const NUMBERED = /^\s*\d+[.)]\s+/

function el(tag, children) {
  const node = document.createElement(tag)
  node.append(...children)
  return node
}

function inline(text) {
  const nodes = []
  let at = 0
  for (const match of text.matchAll(INLINE)) {
    if (match.index > at) nodes.push(text.slice(at, match.index))
    const [whole, code, bold, italic, url] = match
    if (code) nodes.push(el('code', [code.slice(1, -1)]))
    else if (bold) nodes.push(el('strong', [bold.slice(2, -2)]))
    else if (italic) nodes.push(el('em', [italic.slice(1, -1)]))
    else if (url) {
      const link = el('a', [url])
      link.href = url
      link.target = '_blank'
      link.rel = 'noopener noreferrer nofollow'
      nodes.push(link)
    }
    at = match.index + whole.length
  }
  if (at < text.length) nodes.push(text.slice(at))
  return nodes
}

const KINDS = [[BULLET, 'ul'], [NUMBERED, 'ol']]

function kindOf(line) {
  const found = KINDS.find(([pattern]) => pattern.test(line))
  return found ? found[1] : 'p'
}

// A run of list lines becomes a list; a run of other lines a paragraph with line breaks.
function blocks(lines) {
  const out = []
  let run = []
  let kind = ''
  const flush = () => {
    if (!run.length) return
    if (kind === 'p') {
      const parts = []
      run.forEach((line, i) => {
        if (i) parts.push(document.createElement('br'))
        parts.push(...inline(line))
      })
      out.push(el('p', parts))
    } else {
      const pattern = kind === 'ul' ? BULLET : NUMBERED
      out.push(el(kind, run.map((line) => el('li', inline(line.replace(pattern, ''))))))
    }
    run = []
  }
  for (const line of lines) {
    const next = kindOf(line)
    if (next !== kind) flush()
    kind = next
    run.push(line)
  }
  flush()
  return out
}

export function format(text) {
  const fragment = document.createDocumentFragment()
  for (const chunk of String(text).split(/\n\s*\n/)) {
    const lines = chunk.split('\n').filter((line) => line.trim())
    fragment.append(...blocks(lines))
  }
  return fragment
}
