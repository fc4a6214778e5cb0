// The /demo page of moai: a shared text editor with presence (remote cursors and names), Yjs over
// moai's own endpoint (ws://HOST/sync/v1/demo-<room>). Bundled by ./build.sh into
// crates/moai-server/assets/demo.js, which the binary embeds: the page needs nothing but the
// server it came from.
//
// Query parameters: `room` (default "main"; the document is `demo-<room>`), `name` (the name
// others see; default a random one), `token` (a connection token, when the server requires
// them: sent as y-websocket's `token` query parameter).

import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'
import { yCollab, yUndoManagerKeymap } from 'y-codemirror.next'
import { EditorState } from '@codemirror/state'
import { EditorView, keymap, lineNumbers, drawSelection, highlightActiveLine } from '@codemirror/view'

const COLORS = [
  ['#30bced', '#30bced33'],
  ['#6eeb83', '#6eeb8333'],
  ['#ffbc42', '#ffbc4233'],
  ['#ee6352', '#ee635233'],
  ['#9ac2c9', '#9ac2c933'],
  ['#8acb88', '#8acb8833'],
  ['#1be7ff', '#1be7ff33'],
  ['#c490d1', '#c490d133']
]
const ANIMALS = ['otter', 'heron', 'lynx', 'gecko', 'ibis', 'puffin', 'marten', 'newt', 'tapir', 'wren']

const params = new URLSearchParams(window.location.search)
const room = (params.get('room') || 'main').replace(/[^A-Za-z0-9_.-]/g, '').slice(0, 64) || 'main'
const docId = 'demo-' + room
let [color, colorLight] = COLORS[Math.floor(Math.random() * COLORS.length)]
const name = (params.get('name') || ANIMALS[Math.floor(Math.random() * ANIMALS.length)]).slice(0, 32)
const token = params.get('token')

const ydoc = new Y.Doc()
const ytext = ydoc.getText('text')
const wsBase = (window.location.protocol === 'https:' ? 'wss://' : 'ws://') + window.location.host + '/sync/v1'
const provider = new WebsocketProvider(wsBase, docId, ydoc, {
  params: token ? { token } : {},
  // Two tabs of one browser would otherwise sync through a BroadcastChannel and hide whether
  // the server works: every byte goes through moai.
  disableBc: true
})
provider.awareness.setLocalStateField('user', { name, color, colorLight })

const undoManager = new Y.UndoManager(ytext)
const view = new EditorView({
  state: EditorState.create({
    doc: ytext.toString(),
    extensions: [
      keymap.of([...yUndoManagerKeymap]),
      lineNumbers(),
      drawSelection(),
      highlightActiveLine(),
      EditorView.lineWrapping,
      yCollab(ytext, provider.awareness, { undoManager })
    ]
  }),
  parent: document.getElementById('editor')
})

// Status line and the list of people here, from the provider's events.
const $ = (id) => document.getElementById(id)
$('room').textContent = docId
$('me').textContent = name
$('me').style.color = color

const setStatus = (status) => {
  const el = $('status')
  el.textContent = status
  el.className = 'status ' + status
}
provider.on('status', ({ status }) => setStatus(status))
provider.on('sync', (synced) => { if (synced) setStatus('synced') })
// The server refused the connection for good (4401 no or bad token, 4403 not allowed, …):
// y-websocket stops reconnecting; say why.
provider.on('closed', ({ code, reason }) => {
  setStatus('refused')
  $('status').textContent = 'refused by the server (' + code + (reason ? ': ' + reason : '') + ')' + (token ? '' : '; add ?token=… to the address')
})

const renderPeople = () => {
  const list = $('people')
  list.replaceChildren()
  provider.awareness.getStates().forEach((state, clientId) => {
    if (!state.user) return
    const li = document.createElement('li')
    const dot = document.createElement('span')
    dot.className = 'dot'
    dot.style.background = String(state.user.color || '#999')
    li.append(dot, document.createTextNode(String(state.user.name || 'anonymous')))
    if (clientId === ydoc.clientID) li.append(document.createTextNode(' (you)'))
    li.dataset.clientId = String(clientId)
    list.append(li)
  })
}
// Once we see who is here, take a colour nobody else has (if one is left). Of two with the same
// colour, the one with the higher client id moves, so they never both move.
const avoidTakenColour = () => {
  const taken = new Set()
  let clash = false
  provider.awareness.getStates().forEach((state, clientId) => {
    if (clientId === ydoc.clientID || !state.user) return
    taken.add(state.user.color)
    if (state.user.color === color && clientId < ydoc.clientID) clash = true
  })
  if (!clash) return
  const free = COLORS.find(([c]) => !taken.has(c))
  if (!free) return
  ;[color, colorLight] = free
  provider.awareness.setLocalStateField('user', { name, color, colorLight })
  $('me').style.color = color
}
provider.awareness.on('change', () => { avoidTakenColour(); renderPeople() })
renderPeople()

// For whoever wants to poke at it from the console.
window.moaiDemo = { ydoc, ytext, provider, view }
