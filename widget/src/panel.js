// The widget's nodes: a <sitekit-chat> host with an open shadow root holding the launcher and
// the panel. Built with createElement and text only; no markup strings, no style attributes.

import { say } from './strings.js'
import { css } from './styles.js'

export function h(tag, attributes = {}, children = []) {
  const node = document.createElement(tag)
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value)
  node.append(...children)
  return node
}

function icon() {
  const ns = 'http://www.w3.org/2000/svg'
  const svg = document.createElementNS(ns, 'svg')
  const path = document.createElementNS(ns, 'path')
  svg.setAttribute('viewBox', '0 0 24 24')
  svg.setAttribute('aria-hidden', 'true')
  svg.setAttribute('focusable', 'false')
  path.setAttribute('d', 'M4 3h16a2 2 0 0 1 2 2v11a2 2 0 0 1-2 2H9l-5 4v-4a2 2 0 0 1-2-2V5a2 2 0 0 1 2-2z')
  svg.append(path)
  return svg
}

function adopt(root, text) {
  if ('adoptedStyleSheets' in root) {
    // Constructed stylesheets are not subject to a page's style-src: a strict CSP allows them.
    const sheet = new CSSStyleSheet()
    sheet.replaceSync(text)
    root.adoptedStyleSheets = [sheet]
  } else {
    root.append(h('style', {}, [text]))
  }
}

export function buildPanel({ words, lang, name, side, accent, starters }) {
  const host = h('sitekit-chat')
  const root = host.attachShadow({ mode: 'open' })
  adopt(root, css(side, accent))
  const launcher = h('button', {
    type: 'button', class: 'launcher', 'aria-label': say(words.open, { name }),
    'aria-expanded': 'false', 'aria-controls': 'panel',
  }, [icon()])
  const log = h('div', { class: 'log', role: 'log', 'aria-live': 'polite', tabindex: '0',
    'aria-label': name })
  const group = h('div', { class: 'starters', role: 'group', 'aria-label': words.suggestions },
    starters.map((prompt) => h('button', { type: 'button' }, [prompt])))
  const status = h('p', { class: 'status', role: 'status' })
  const input = h('textarea', { rows: '1', 'aria-label': words.message,
    placeholder: words.placeholder, maxlength: '4000' })
  const button = h('button', { type: 'submit', class: 'send' }, [words.send])
  const form = h('form', {}, [input, button])
  const close = h('button', { type: 'button', class: 'close', 'aria-label': words.close }, ['×'])
  const panel = h('section', {
    class: 'panel', id: 'panel', role: 'dialog', 'aria-labelledby': 'title', lang, hidden: '',
  }, [h('header', {}, [h('h2', { id: 'title' }, [name]), close]), log, group, status, form])
  root.append(panel, launcher)
  return { host, launcher, panel, log, starters: group, status, input, button, form,
    closeButton: close }
}
