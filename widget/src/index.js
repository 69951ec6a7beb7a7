// Set-up from the script tag's data-* attributes:
//
//   <script src="https://GATEWAY/widget.js" data-agent="AGENT_ID" data-key="PUBLISHABLE_KEY"
//           data-position="bottom-left" data-open data-accent="#0f766e" data-locale="de" async>
//
// and the API on window.SiteKit: open(), close(), destroy(), isOpen.

import { Widget } from './widget.js'

// The gateway serves the bundle at /widget.js and /widget/<version>/widget.js: its base URL is
// what comes before either.
const BUNDLE_PATH = /\/widget(?:\/[\w-]+\/widget)?\.js$/

function boot() {
  const script = document.currentScript || document.querySelector('script[data-agent][data-key]')
  const data = script ? script.dataset : {}
  if (window.SiteKit) {
    console.warn('Site Kit: the widget is already on this page; this copy does nothing.')
    return
  }
  if (!data.agent || !data.key) {
    console.error('Site Kit: the widget script tag needs data-agent and data-key.')
    return
  }
  const src = new URL(script.src || location.href, location.href)
  const api = {}
  const widget = new Widget({
    base: data.gateway || src.origin + src.pathname.replace(BUNDLE_PATH, ''),
    agent: data.agent,
    key: data.key,
    position: data.position,
    open: data.open !== undefined && data.open !== 'false',
    accent: data.accent,
    locale: data.locale,
  }, () => {
    if (window.SiteKit === api) delete window.SiteKit
  })
  Object.assign(api, {
    open: () => widget.open(true),
    close: () => widget.close(),
    destroy: () => widget.destroy(),
  })
  Object.defineProperty(api, 'isOpen', { get: () => widget.isOpen })
  window.SiteKit = Object.freeze(api)
  widget.start()
}

boot()
