// The widget's words, per language; `{n}` is a number of seconds, `{name}` the agent's name.

const STRINGS = {
  en: {
    open: 'Open chat with {name}',
    close: 'Close chat',
    send: 'Send',
    stop: 'Stop',
    message: 'Message',
    placeholder: 'Type your message…',
    suggestions: 'Suggestions',
    you: 'You:',
    typing: '{name} is typing…',
    stopped: 'Stopped.',
    rate_limited: 'Too many messages. Try again in {n} seconds.',
    unavailable: 'The assistant is unavailable right now. Please try again later.',
    refused: 'This chat is not available on this website.',
    failed: 'The assistant could not answer. Please try again.',
    network: 'No connection. Please check your network and try again.',
    cut: 'The connection was lost before the answer was complete.',
    network_retry: 'Connection lost. Retrying in {n} seconds…',
    unavailable_retry: 'The assistant is busy. Retrying in {n} seconds…',
  },
  de: {
    open: 'Chat mit {name} öffnen',
    close: 'Chat schließen',
    send: 'Senden',
    stop: 'Stopp',
    message: 'Nachricht',
    placeholder: 'Nachricht eingeben…',
    suggestions: 'Vorschläge',
    you: 'Sie:',
    typing: '{name} schreibt…',
    stopped: 'Angehalten.',
    rate_limited: 'Zu viele Nachrichten. Bitte in {n} Sekunden erneut versuchen.',
    unavailable: 'Der Assistent ist gerade nicht erreichbar. Bitte später erneut versuchen.',
    refused: 'Dieser Chat ist auf dieser Website nicht verfügbar.',
    failed: 'Der Assistent konnte nicht antworten. Bitte erneut versuchen.',
    network: 'Keine Verbindung. Bitte Netzwerk prüfen und erneut versuchen.',
    cut: 'Die Verbindung brach ab, bevor die Antwort vollständig war.',
    network_retry: 'Verbindung verloren. Neuer Versuch in {n} Sekunden…',
    unavailable_retry: 'Der Assistent ist ausgelastet. Neuer Versuch in {n} Sekunden…',
  },
  fr: {
    open: 'Ouvrir le chat avec {name}',
    close: 'Fermer le chat',
    send: 'Envoyer',
    stop: 'Arrêter',
    message: 'Message',
    placeholder: 'Écrivez votre message…',
    suggestions: 'Suggestions',
    you: 'Vous :',
    typing: '{name} écrit…',
    stopped: 'Arrêté.',
    rate_limited: 'Trop de messages. Réessayez dans {n} secondes.',
    unavailable: "L'assistant est indisponible pour le moment. Réessayez plus tard.",
    refused: "Ce chat n'est pas disponible sur ce site.",
    failed: "L'assistant n'a pas pu répondre. Réessayez.",
    network: 'Pas de connexion. Vérifiez votre réseau et réessayez.',
    cut: 'La connexion a été perdue avant la fin de la réponse.',
    network_retry: 'Connexion perdue. Nouvel essai dans {n} secondes…',
    unavailable_retry: "L'assistant est occupé. Nouvel essai dans {n} secondes…",
  },
  es: {
    open: 'Abrir el chat con {name}',
    close: 'Cerrar el chat',
    send: 'Enviar',
    stop: 'Detener',
    message: 'Mensaje',
    placeholder: 'Escribe tu mensaje…',
    suggestions: 'Sugerencias',
    you: 'Tú:',
    typing: '{name} está escribiendo…',
    stopped: 'Detenido.',
    rate_limited: 'Demasiados mensajes. Inténtalo de nuevo en {n} segundos.',
    unavailable: 'El asistente no está disponible ahora. Inténtalo más tarde.',
    refused: 'Este chat no está disponible en este sitio.',
    failed: 'El asistente no pudo responder. Inténtalo de nuevo.',
    network: 'Sin conexión. Revisa tu red e inténtalo de nuevo.',
    cut: 'Se perdió la conexión antes de completar la respuesta.',
    network_retry: 'Conexión perdida. Reintentando en {n} segundos…',
    unavailable_retry: 'El asistente está ocupado. Reintentando en {n} segundos…',
  },
}

// The words for the first of `locales` we speak (by language: "de-AT" gets German), else English.
export function strings(locales) {
  for (const locale of locales) {
    const found = locale && STRINGS[String(locale).toLowerCase().split(/[-_]/)[0]]
    if (found) return { lang: String(locale), words: found }
  }
  return { lang: 'en', words: STRINGS.en }
}

export function say(template, values) {
  return template.replace(/\{(\w+)\}/g, (_, key) => String(values[key] ?? ''))
}
