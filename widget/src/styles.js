// The widget's one stylesheet, adopted by its shadow root. Nothing the host page writes can
// reach inside the shadow root; what reaches the host element (`:host`) is beaten by the
// !important rules below, because for important declarations the shadow tree's win
// (https://www.w3.org/TR/css-cascade-5/#cascade-context). Sizes are in px, never rem: a
// host page's root font size must not scale the widget. `all` leaves `direction` alone, so it
// is set too: an rtl page must not mirror English text.

const DEFAULT_ACCENT = '#2563eb'

// Black or white, whichever reads on the accent (WCAG contrast of at least 4.5:1).
function onAccent(hex) {
  const full = hex.length === 4 ? hex.replace(/\w/g, (c) => c + c) : hex
  const [r, g, b] = [1, 3, 5].map((i) => {
    const c = parseInt(full.slice(i, i + 2), 16) / 255
    return c <= 0.04045 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4
  })
  return 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.18 ? '#000' : '#fff'
}

export function isColor(value) {
  return /^#([0-9a-f]{3}|[0-9a-f]{6})$/i.test(value || '')
}

export function css(side, accent = DEFAULT_ACCENT) {
  const other = side === 'left' ? 'right' : 'left'
  return `
:host{all:initial!important;display:block!important;position:fixed!important;
z-index:2147483000!important;bottom:20px!important;${side}:20px!important;${other}:auto!important;
top:auto!important;width:auto!important;height:auto!important;margin:0!important;
padding:0!important;transform:none!important;filter:none!important;opacity:1!important;
visibility:visible!important;color:#1f2328!important;direction:ltr!important;
font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif!important;
--sk-accent:${accent}!important;--sk-on:${onAccent(accent)}!important}
*,*::before,*::after{box-sizing:border-box}
[hidden]{display:none!important}
button,textarea{font:inherit;color:inherit;margin:0}
button{cursor:pointer}
:focus-visible{outline:3px solid #1f2328;outline-offset:2px}
.launcher{display:flex;align-items:center;justify-content:center;width:56px;height:56px;
padding:0;border:0;border-radius:28px;background:var(--sk-accent);color:var(--sk-on);
box-shadow:0 4px 14px rgba(0,0,0,.25)}
.launcher svg{width:28px;height:28px;fill:currentColor}
.panel{position:absolute;bottom:72px;${side}:0;display:flex;flex-direction:column;
width:380px;max-width:calc(100vw - 40px);height:600px;max-height:calc(100vh - 112px);
overflow:hidden;background:#fff;border:1px solid #d0d7de;border-radius:12px;
box-shadow:0 8px 32px rgba(0,0,0,.28)}
header{display:flex;align-items:center;gap:8px;padding:10px 10px 10px 16px;
background:var(--sk-accent);color:var(--sk-on)}
h2{flex:1;margin:0;overflow:hidden;font-size:16px;font-weight:600;white-space:nowrap;
text-overflow:ellipsis}
.close{width:36px;height:36px;padding:0;border:0;border-radius:18px;background:transparent;
font-size:24px;line-height:1}
.close:hover{background:rgba(127,127,127,.3)}
.log{flex:1;display:flex;flex-direction:column;gap:10px;padding:16px;overflow-y:auto;
overscroll-behavior:contain}
.msg{max-width:85%;padding:8px 12px;border-radius:12px;overflow-wrap:anywhere}
.bot{align-self:flex-start;background:#f1f3f5}
.user{align-self:flex-end;background:var(--sk-accent);color:var(--sk-on)}
.msg p,.msg ul,.msg ol{margin:0 0 6px}
.msg>:last-child,.body>:last-child{margin-bottom:0}
.msg ul,.msg ol{padding-left:20px}
.msg code{padding:1px 4px;border-radius:4px;background:rgba(0,0,0,.08);
font:13px ui-monospace,Menlo,Consolas,monospace}
.bot a{color:#0b57d0}
.user a{color:inherit}
.note{font-style:italic;color:#57606a}
.sr{position:absolute;width:1px;height:1px;overflow:hidden;clip:rect(0 0 0 0);white-space:nowrap}
.starters{display:flex;flex-wrap:wrap;gap:6px;padding:0 16px 8px}
.starters button{padding:6px 12px;border:1px solid var(--sk-accent);border-radius:16px;
background:#fff;font-size:14px}
.status{margin:0;padding:0 16px;font-size:13px;color:#57606a}
.status:not(:empty){padding-bottom:8px}
.status.error{color:#b42318}
form{display:flex;align-items:flex-end;gap:8px;margin:0;padding:12px;border-top:1px solid #d0d7de}
textarea{flex:1;height:40px;max-height:120px;padding:8px 10px;resize:none;
border:1px solid #6e7781;border-radius:8px;background:#fff;font-size:16px;line-height:1.4}
textarea::placeholder{color:#6e7781}
.send{height:40px;padding:0 16px;border:0;border-radius:8px;background:var(--sk-accent);
color:var(--sk-on);font-weight:600}
.send[data-busy]{background:#1f2328;color:#fff}
@media (max-width:480px){.panel{position:fixed;inset:0;width:100%;max-width:none;
height:100%;max-height:none;border:0;border-radius:0}}
`
}
