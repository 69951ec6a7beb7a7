// The chat widget: a launcher button and a chat panel in a shadow root, one conversation with
// one agent. Every listener is added with one AbortSignal and every timer is tracked, so
// destroy() leaves nothing behind. Events go to `document` as `sitekit:<name>` CustomEvents;
// `open`, `close` and `send` can be cancelled with preventDefault().

import { fetchConfig, keyOrigins, streamChat } from './client.js'
import { format } from './format.js'
import { loadConversation, saveConversation } from './store.js'
import { buildPanel, h } from './panel.js'
import { say, strings } from './strings.js'
import { isColor } from './styles.js'

// Retries of a turn that got no answer: after a network loss, waits of about 1, 2, 4, 8 and
// 16 s; while the gateway says it is unavailable (503), fewer, as long as its Retry-After.
const RETRIES = { network: 5, unavailable: 2 }
const CONFIG_RETRIES = 2

function fail(message) {
  console.error(`Site Kit: ${message}`)
}

export class Widget {
  constructor(options, onDestroy) {
    this.options = options // {base, agent, key, position, open, accent, locale}
    this.onDestroy = onDestroy
    this.listeners = new AbortController()
    this.timers = new Set()
    this.turn = null
    this.host = null
    this.destroyed = false
    this.wantOpen = options.open
  }

  get isOpen() {
    return Boolean(this.panel && !this.panel.hidden)
  }

  emit(name, detail = {}, cancelable = false) {
    return document.dispatchEvent(new CustomEvent(`sitekit:${name}`, { detail, cancelable }))
  }

  on(target, type, handler) {
    target.addEventListener(type, handler, { signal: this.listeners.signal })
  }

  // Resolves after `ms`, or at once when `signal` aborts, the browser comes back online, or
  // the widget is destroyed.
  sleep(ms, signal) {
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer)
        this.timers.delete(done)
        resolve()
      }
      const timer = setTimeout(done, ms)
      this.timers.add(done)
      if (signal) signal.addEventListener('abort', done, { once: true })
      if (!navigator.onLine) {
        window.addEventListener('online', done, { once: true, signal: this.listeners.signal })
      }
    })
  }

  async start() {
    const { base, agent, key } = this.options
    const origins = keyOrigins(key)
    if (!origins) {
      fail('data-key is not a publishable key. Never put a secret key in a web page.')
      return
    }
    if (!origins.includes(location.origin)) {
      fail(`the origin ${location.origin} is not allowed to use agent ${agent} `
        + `(its key allows ${origins.join(', ') || 'no origin'}). No chat on this page.`)
      this.emit('error', { kind: 'refused' })
      return
    }
    let config
    for (let attempt = 0; !config; attempt++) {
      try {
        config = await fetchConfig(base, agent, key)
      } catch (err) {
        if (this.destroyed) return
        const retryable = err.kind === 'network' || err.kind === 'unavailable'
        if (retryable && attempt < CONFIG_RETRIES) {
          await this.sleep(Math.max(err.retryAfter * 1000, 500 * 2 ** attempt))
          if (this.destroyed) return
          continue
        }
        fail(err.kind === 'network'
          ? `could not load agent ${agent} from ${base}: the gateway is unreachable, or it `
            + `refused this origin (${location.origin}). No chat on this page.`
          : `${err.kind === 'refused' ? 'the gateway refused' : 'could not load'} agent `
            + `${agent} on ${location.origin}: ${err.message}. No chat on this page.`)
        this.emit('error', { kind: err.kind, message: err.message, request_id: err.requestId })
        return
      }
    }
    if (document.readyState === 'loading') {
      await new Promise((resolve) => this.on(document, 'DOMContentLoaded', resolve))
    }
    if (!this.destroyed) this.render(config)
  }

  render(config) {
    const { words, lang } = strings([this.options.locale, config.locale, navigator.language])
    const theme = config.theme || {}
    let accent = this.options.accent || theme.accent
    if (accent && !isColor(accent)) {
      console.warn(`Site Kit: ignoring accent ${accent}; use a #rgb or #rrggbb colour`)
      accent = undefined
    }
    const side = (this.options.position || theme.position || '').endsWith('left') ? 'left' : 'right'
    this.words = words
    this.name = config.name || 'Assistant'
    this.conversation = loadConversation(this.options.agent)

    const { form, closeButton, ...parts } = buildPanel({ words, lang, name: this.name, side,
      accent, starters: (config.starter_prompts || []).slice(0, 4).map(String) })
    Object.assign(this, parts) // host, launcher, panel, log, starters, status, input, button
    for (const button of this.starters.children) {
      this.on(button, 'click', () => this.send(button.textContent))
    }

    if (config.greeting) this.addMessage('bot', config.greeting)
    for (const message of this.conversation.messages) {
      this.addMessage(message.role, message.text, message.note)
    }
    this.starters.hidden = this.conversation.messages.length > 0

    this.on(this.launcher, 'click', () => (this.isOpen ? this.close() : this.open(true)))
    this.on(closeButton, 'click', () => this.close())
    this.on(this.panel, 'keydown', (event) => {
      if (event.key === 'Escape') {
        event.stopPropagation()
        this.close()
      }
    })
    this.on(form, 'submit', (event) => {
      event.preventDefault()
      if (this.turn) this.turn.abort()
      else this.send(this.input.value)
    })
    this.on(this.input, 'keydown', (event) => {
      if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
        event.preventDefault()
        if (!this.turn) this.send(this.input.value)
      }
    })
    this.on(this.input, 'input', () => {
      // CSSOM writes are not style attributes: a strict CSP allows them.
      this.input.style.height = 'auto'
      this.input.style.height = `${Math.min(this.input.scrollHeight + 2, 120)}px`
    })
    document.body.append(this.host)
    this.emit('ready', { agent: this.options.agent, name: this.name })
    if (this.wantOpen) this.open(this.wantOpen === 'focus')
  }

  open(focus = true) {
    if (!this.panel) {
      this.wantOpen = focus ? 'focus' : true
      return
    }
    if (this.isOpen || !this.emit('open', {}, true)) return
    this.panel.hidden = false
    this.launcher.setAttribute('aria-expanded', 'true')
    this.log.scrollTop = this.log.scrollHeight
    if (focus) this.input.focus()
  }

  close() {
    if (!this.panel) {
      this.wantOpen = false
      return
    }
    if (!this.isOpen || !this.emit('close', {}, true)) return
    const hadFocus = this.panel.contains(this.host.shadowRoot.activeElement)
    this.panel.hidden = true
    this.launcher.setAttribute('aria-expanded', 'false')
    if (hadFocus) this.launcher.focus()
  }

  destroy() {
    if (this.destroyed) return
    this.destroyed = true
    if (this.turn) this.turn.abort()
    this.listeners.abort()
    for (const done of [...this.timers]) done()
    this.emit('destroy', { agent: this.options.agent })
    if (this.host) this.host.remove()
    this.host = this.panel = null
    this.onDestroy()
  }

  addMessage(role, text, note) {
    const body = h('div', { class: 'body' }, [format(text)])
    const item = h('div', { class: `msg ${role}` }, [
      h('span', { class: 'sr' }, [role === 'user' ? this.words.you : `${this.name}:`]), body])
    if (note) item.append(h('p', { class: 'note' }, [this.words[note]]))
    this.log.append(item)
    this.log.scrollTop = this.log.scrollHeight
    return body
  }

  setStatus(text, isError = false) {
    this.status.textContent = text
    this.status.classList.toggle('error', isError)
  }

  busy(on) {
    this.button.textContent = on ? this.words.stop : this.words.send
    this.button.toggleAttribute('data-busy', on)
    this.log.setAttribute('aria-busy', String(on))
  }

  send(text) {
    text = String(text || '').trim()
    if (!text || this.turn || !this.panel || !this.emit('send', { text }, true)) return
    this.input.value = ''
    this.input.style.height = ''
    this.starters.hidden = true
    this.addMessage('user', text)
    this.conversation.messages.push({ role: 'user', text })
    saveConversation(this.options.agent, this.conversation)
    this.ask(text)
  }

  async ask(text) {
    const { base, agent, key } = this.options
    const turn = new AbortController()
    this.turn = turn
    this.busy(true)
    this.setStatus(say(this.words.typing, { name: this.name }))
    let answer = ''
    let body = null
    let note = ''
    for (let attempt = 0; ; attempt++) {
      try {
        const end = await streamChat(base, agent, key, text, this.conversation.session,
          turn.signal, (token) => {
            answer += token
            body = body || this.addMessage('bot', '')
            body.replaceChildren(format(answer))
            this.log.scrollTop = this.log.scrollHeight
          })
        this.setStatus('')
        this.emit('answer', { text: answer, request_id: end.request_id,
          session_id: end.session_id })
        break
      } catch (err) {
        if (this.destroyed) return
        if (!turn.signal.aborted && !answer && attempt < (RETRIES[err.kind] || 0)) {
          // Jitter spreads the retries of many visitors; never sooner than Retry-After.
          const seconds = Math.max(err.retryAfter, 2 ** attempt * (0.8 + Math.random() * 0.4))
          this.setStatus(say(this.words[`${err.kind}_retry`], { n: Math.ceil(seconds) }), true)
          await this.sleep(seconds * 1000, turn.signal)
          if (this.destroyed) return
          if (!turn.signal.aborted) continue
        }
        if (turn.signal.aborted) {
          note = 'stopped'
          this.setStatus(this.words.stopped)
          this.emit('answer', { text: answer, stopped: true })
          break
        }
        note = answer ? 'cut' : ''
        this.setStatus(say(this.words[err.kind] || this.words.failed, { n: err.retryAfter }), true)
        this.emit('error', { kind: err.kind, message: err.message, retry_after: err.retryAfter,
          request_id: err.requestId })
        if (err.kind === 'rate_limited' && !this.input.value) this.input.value = text
        break
      }
    }
    if (answer || note) {
      body = body || this.addMessage('bot', '')
      if (note) body.parentNode.append(h('p', { class: 'note' }, [this.words[note]]))
      this.conversation.messages.push({ role: 'bot', text: answer, ...(note && { note }) })
      saveConversation(agent, this.conversation)
    }
    this.turn = null
    this.busy(false)
  }
}
