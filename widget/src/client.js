// The gateway's HTTP API as the widget uses it: the agent's public settings and a streamed
// chat turn, with every failure turned into one ChatError whose `kind` the panel puts in words.
//
//   kind          when
//   network       the request never got an answer (offline, DNS, CORS refusal): retryable
//   unavailable   503, or the runtime is down: retryable after Retry-After
//   rate_limited  429: `retryAfter` seconds
//   refused       401/403: the key, the agent or this origin is not allowed
//   failed        the agent could not answer (502, 504, an `error` event, a 4xx)
//   cut           the stream broke after the answer had started

export class ChatError extends Error {
  constructor(kind, message, retryAfter = 0, requestId = '') {
    super(message || kind)
    this.kind = kind
    this.retryAfter = retryAfter
    this.requestId = requestId
  }
}

// The origins a publishable key is valid for, read from its (public) claims; null when the
// key is not a publishable key at all.
export function keyOrigins(key) {
  try {
    const part = key.split('.')[1].replace(/-/g, '+').replace(/_/g, '/')
    const claims = JSON.parse(atob(part))
    return claims.kty === 'publishable' && Array.isArray(claims.origins) ? claims.origins : null
  } catch {
    return null
  }
}

function request(base, agent, key, path, init) {
  return fetch(`${base}/v1/agents/${encodeURIComponent(agent)}/${path}`, {
    ...init,
    mode: 'cors',
    credentials: 'omit',
    cache: 'no-store',
    headers: { Authorization: `Bearer ${key}`, ...init.headers },
  }).catch((err) => {
    if (init.signal && init.signal.aborted) throw err
    throw new ChatError('network', String(err && err.message))
  })
}

async function errorOf(response) {
  let error = {}
  try {
    error = (await response.json()).error || {}
  } catch {
    // not our JSON: the status says enough
  }
  const { status } = response
  const retryAfter = parseInt(response.headers.get('Retry-After') || '', 10) || 0
  const kind = status === 429 ? 'rate_limited'
    : status === 401 || status === 403 ? 'refused'
      : status === 503 ? 'unavailable'
        : 'failed'
  return new ChatError(kind, error.message, kind === 'rate_limited' ? retryAfter || 1 : retryAfter,
    error.request_id)
}

export async function fetchConfig(base, agent, key) {
  const response = await request(base, agent, key, 'config', { method: 'GET', headers: {} })
  if (!response.ok) throw await errorOf(response)
  return response.json()
}

const EVENT_KINDS = { rate_limited: 'rate_limited', unavailable: 'unavailable' }

// One chat turn: calls onToken(text) for each token in order, resolves with the `end` data.
export async function streamChat(base, agent, key, message, sessionId, signal, onToken) {
  const response = await request(base, agent, key, 'chat', {
    method: 'POST',
    signal,
    headers: { 'Content-Type': 'application/json', Accept: 'text/event-stream' },
    body: JSON.stringify({ message, session_id: sessionId }),
  })
  if (!response.ok) throw await errorOf(response)
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader()
  let pending = ''
  let name = ''
  let data = []
  let afterCR = false
  for (;;) {
    let chunk
    try {
      chunk = await reader.read()
    } catch (err) {
      if (signal.aborted) throw err
      throw new ChatError('cut', String(err && err.message))
    }
    if (chunk.done) throw new ChatError('cut', 'the answer ended early')
    let text = chunk.value
    // A CRLF split across two chunks is one line break, not two.
    if (afterCR && text[0] === '\n') text = text.slice(1)
    afterCR = text.endsWith('\r')
    const lines = (pending + text).split(/\r\n|\r|\n/)
    pending = lines.pop()
    for (const line of lines) {
      // https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation
      if (line === '') {
        if (data.length) {
          const payload = JSON.parse(data.join('\n'))
          if (name === 'token') onToken(payload.text)
          else if (name === 'end') return payload
          else if (name === 'error') {
            throw new ChatError(EVENT_KINDS[payload.code] || 'failed', payload.message, 0,
              payload.request_id)
          }
        }
        name = ''
        data = []
      } else if (line[0] !== ':') {
        const colon = line.indexOf(':')
        const field = colon < 0 ? line : line.slice(0, colon)
        let value = colon < 0 ? '' : line.slice(colon + 1)
        if (value[0] === ' ') value = value.slice(1)
        if (field === 'event') name = value
        else if (field === 'data') data.push(value)
      }
    }
  }
}
