// The conversation kept in localStorage, one entry per agent, so a reload (or the next page
// of the site) goes on with the same session. Storage may be full or blocked: then the chat
// works for this page only.

const PREFIX = 'sitekit:'
const KEEP = 50

function newSessionId() {
  const bytes = crypto.getRandomValues(new Uint8Array(16))
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('')
}

export function loadConversation(agent) {
  try {
    const saved = JSON.parse(localStorage.getItem(PREFIX + agent))
    if (saved && typeof saved.session === 'string' && Array.isArray(saved.messages)) {
      const messages = saved.messages.filter(
        (m) => m && (m.role === 'user' || m.role === 'bot') && typeof m.text === 'string')
      return { session: saved.session, messages }
    }
  } catch {
    // unreadable or blocked: start afresh
  }
  return { session: newSessionId(), messages: [] }
}

export function saveConversation(agent, conversation) {
  try {
    localStorage.setItem(PREFIX + agent, JSON.stringify({
      session: conversation.session,
      messages: conversation.messages.slice(-KEEP),
    }))
  } catch {
    // full or blocked
  }
}
