// The Coordinator inspector: a zone's session tree and delegation graph, live from the event feed.
// Plain script, no build step. Every API call carries the operator token (kept in sessionStorage)
// as its bearer; every value from the API reaches the page as text (textContent), never as markup.
(function () {
  'use strict';

  const TOKEN_KEY = 'coordinator.inspector.token';
  const ZONE_KEY = 'coordinator.inspector.zone';
  const PAGE_LIMIT = 500;           // the API's largest page
  const GRID_ABOVE = 400;           // nodes: a tree layout up to this many, a grid (in tree order) above
  const LIST_SHOWN = 300;           // session list items rendered at once (the search narrows them)
  const REFRESH_DEBOUNCE_MS = 300;  // events arriving together cause one re-read
  const REFRESH_MIN_GAP_MS = 1000;  // and re-reads are at least this far apart
  const ENDED_LOOKUPS = 10;         // sources whose outbound edges are read per refresh, to colour ended edges
  const SLIDER_STEPS = 1000;

  const $ = (id) => document.getElementById(id);
  const enc = encodeURIComponent;

  const state = {
    token: sessionStorage.getItem(TOKEN_KEY) || '',
    zone: localStorage.getItem(ZONE_KEY) || '',
    config: { temporal_ui_url: '', temporal_namespace: 'default' },
    sessions: new Map(),      // id -> session body (as of `at` when set)
    active: new Map(),        // id -> active edge (as of `at` when set)
    ended: new Map(),         // id -> edge no longer active (revoked, expired), live view only
    at: null,                 // null: live; else an ISO instant
    window: null,             // {earliest, latest} of GET history/window
    selected: null,
    preview: null,            // {filter, epoch, result}
    feedGen: 0,
    feedCtrl: null,
    cursor: null,             // last event cursor seen
    listCurrent: -1,
    listItems: [],
    loadSeq: 0,
    connected: false,
  };
  const stats = { feedEvents: 0, refreshes: 0, lastRenderMs: 0, layout: '', feedConnects: 0, recent: [] };
  let cy = null;

  // ---------------------------------------------------------------------------------------------
  // API
  // ---------------------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, body) {
      super(code);
      this.status = status;
      this.code = code;
      this.body = body;
    }
  }

  async function api(path, { method = 'GET', body, headers = {} } = {}) {
    const init = { method, headers: { Authorization: 'Bearer ' + state.token, Accept: 'application/json', ...headers } };
    if (body !== undefined) {
      init.body = JSON.stringify(body);
      init.headers['Content-Type'] = 'application/json';
    }
    let resp;
    try {
      resp = await fetch(path, init);
    } catch (e) {
      throw new ApiError(0, 'network_error', null);
    }
    const text = await resp.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (e) { data = null; }
    if (!resp.ok) throw new ApiError(resp.status, (data && data.error) || 'http_' + resp.status, data);
    return data;
  }

  const zpath = (rest) => '/zones/' + enc(state.zone) + '/' + rest;
  const withQuery = (path, params) => {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(params)) if (v !== null && v !== undefined && v !== '') q.set(k, v);
    const s = q.toString();
    return s ? path + (path.includes('?') ? '&' : '?') + s : path;
  };

  async function pageAll(rest, params = {}) {
    const items = [];
    let cursor = null;
    for (let i = 0; i < 10000; i++) {
      const page = await api(withQuery(zpath(rest), { ...params, limit: PAGE_LIMIT, cursor }));
      items.push(...(page.items || []));
      if (!page.next_cursor) break;
      cursor = page.next_cursor;
    }
    return items;
  }

  function errorText(err) {
    if (err instanceof ApiError) {
      const extra = err.body && (err.body.message || err.body.error_description);
      return { code: err.code, detail: (err.status ? 'HTTP ' + err.status : '') + (extra ? ': ' + extra : '') };
    }
    return { code: 'client_error', detail: String(err && err.message || err) };
  }

  function showMessage(err, where) {
    const box = $('message');
    box.replaceChildren();
    box.classList.remove('info');
    if (!err) { box.hidden = true; return; }
    const { code, detail } = errorText(err);
    box.append((where ? where + ': ' : '') + 'error ');
    const c = document.createElement('code');
    c.className = 'error-code';
    c.dataset.code = code;
    c.textContent = code;
    box.append(c);
    if (detail) box.append(' (' + detail + ')');
    box.hidden = false;
  }

  function showInfo(text) {
    const box = $('message');
    box.replaceChildren(text);
    box.classList.add('info');
    box.hidden = false;
  }

  function errorNode(err) {
    const { code, detail } = errorText(err);
    const p = document.createElement('p');
    p.append('error ');
    const c = document.createElement('code');
    c.className = 'error-code';
    c.dataset.code = code;
    c.textContent = code;
    p.append(c);
    if (detail) p.append(' (' + detail + ')');
    return p;
  }

  // ---------------------------------------------------------------------------------------------
  // Graph
  // ---------------------------------------------------------------------------------------------

  const css = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  const statusClass = (s) => (['active', 'suspended', 'terminated', 'expired', 'revoked'].includes(s) ? s : 'other');

  function graphStyle() {
    return [
      { selector: 'node', style: {
        'background-color': css('--s-other'), label: 'data(label)', 'font-size': 10, 'text-wrap': 'wrap',
        'text-valign': 'bottom', 'text-margin-y': 3, color: '#212529', width: 22, height: 22,
        'min-zoomed-font-size': 7, 'text-background-color': '#ffffff', 'text-background-opacity': 0.75,
        'text-background-padding': 1, 'border-width': 1, 'border-color': '#ffffff' } },
      { selector: 'node.st-active', style: { 'background-color': css('--s-active') } },
      { selector: 'node.st-suspended', style: { 'background-color': css('--s-suspended') } },
      { selector: 'node.st-terminated', style: { 'background-color': css('--s-terminated') } },
      { selector: 'node.st-expired', style: { 'background-color': css('--s-expired') } },
      { selector: 'edge', style: { width: 1, 'curve-style': 'straight', 'target-arrow-shape': 'triangle',
        'arrow-scale': 0.8, 'line-color': css('--tree'), 'target-arrow-color': css('--tree'),
        'min-zoomed-font-size': 8, 'font-size': 9 } },
      // bezier, so that a parent edge and a delegation between the same sessions stay apart
      { selector: 'edge.tree', style: { opacity: 0.8, 'curve-style': 'bezier', 'control-point-step-size': 40 } },
      { selector: 'edge.tree.big', style: { 'curve-style': 'straight' } },
      { selector: 'edge.delegation', style: {
        width: 2.5, 'curve-style': 'bezier', 'control-point-step-size': 30, label: 'data(label)',
        'text-rotation': 'autorotate', 'text-background-color': '#ffffff', 'text-background-opacity': 0.85,
        'text-background-padding': 1, color: '#1c3d6e', 'target-arrow-shape': 'vee',
        'line-color': css('--d-active'), 'target-arrow-color': css('--d-active') } },
      { selector: 'edge.delegation.st-revoked', style: {
        'line-color': css('--d-revoked'), 'target-arrow-color': css('--d-revoked'), 'line-style': 'dashed',
        color: '#a51111' } },
      { selector: 'edge.delegation.st-expired, edge.delegation.st-other', style: {
        'line-color': css('--d-expired'), 'target-arrow-color': css('--d-expired'), 'line-style': 'dotted',
        color: '#5c636a' } },
      // Above GRID_ABOVE sessions: thin straight edges, labelled only around the selected session.
      { selector: 'edge.big', style: { width: 1, opacity: 0.45, 'curve-style': 'straight', 'arrow-scale': 0.6,
        label: '' } },
      { selector: 'edge.big.near', style: { opacity: 1, width: 2, label: 'data(label)', 'z-index': 9 } },
      { selector: '.nolabel', style: { label: '' } },
      { selector: 'edge.hl-downstream', style: { 'underlay-color': css('--hl-downstream'), 'underlay-opacity': 0.7,
        'underlay-padding': 5, width: 4 } },
      { selector: 'edge.hl-matched', style: { 'underlay-color': css('--hl-matched'), 'underlay-opacity': 0.9,
        'underlay-padding': 6, width: 4 } },
      { selector: 'node.hl-terminated', style: { 'border-width': 4, 'border-color': css('--d-revoked'),
        'border-style': 'double' } },
      { selector: 'node.current', style: { 'border-width': 4, 'border-color': '#1c7ed6', width: 30, height: 30,
        'font-weight': 'bold', 'z-index': 10 } },
      { selector: 'node:selected', style: { 'overlay-color': '#1c7ed6', 'overlay-opacity': 0.15 } },
    ];
  }

  function initGraph() {
    if (typeof window.cytoscape !== 'function') {
      showMessage(new Error('cytoscape.min.js did not load'));
      return;
    }
    cy = window.cytoscape({
      container: $('graph'), style: graphStyle(), wheelSensitivity: 0.3, minZoom: 0.02, maxZoom: 4,
      hideEdgesOnViewport: false, textureOnViewport: false, motionBlur: false, selectionType: 'single',
      boxSelectionEnabled: false,
    });
    cy.on('tap', 'node', (ev) => openSession(ev.target.id()));
    cy.on('zoom', updateLabels);
    window.inspector.graph = cy;
  }

  // Ids are UUIDv7s whose heads are their creation time: the tail tells them apart.
  function shortId(id, keep = 8) { return id.length > keep + 2 ? '…' + id.slice(-keep) : id; }

  function desiredElements() {
    const els = new Map();
    const big = state.sessions.size > GRID_ABOVE;
    const extra = (stats.labels === false ? ' nolabel' : '');
    for (const s of state.sessions.values()) {
      const id = s.agent_session_id;
      els.set(id, { group: 'nodes', data: { id, label: s.application_id + '\n' + shortId(id), status: s.status },
                    classes: 'session st-' + statusClass(s.status) + extra });
    }
    for (const s of state.sessions.values()) {
      if (s.parent_id && state.sessions.has(s.parent_id)) {
        const id = 'tree:' + s.agent_session_id;
        els.set(id, { group: 'edges', data: { id, source: s.parent_id, target: s.agent_session_id },
                      classes: 'tree' + (big ? ' big' : '') + extra });
      }
    }
    const edges = [...state.active.values()];
    if (state.at === null && $('show-ended').checked) edges.push(...state.ended.values());
    for (const e of edges) {
      if (!state.sessions.has(e.source_session_id) || !state.sessions.has(e.target_session_id)) continue;
      const id = 'del:' + e.id;
      els.set(id, { group: 'edges', data: { id, edge: e.id, source: e.source_session_id, target: e.target_session_id,
                                            label: (e.scopes || []).join(', ') || '(no scopes)', status: e.status },
                    classes: 'delegation st-' + statusClass(e.status) + (big ? ' big' : '') + extra });
    }
    return els;
  }

  function redraw({ forceLayout = false } = {}) {
    if (!cy) return;
    const t0 = performance.now();
    const want = desiredElements();
    let nodesChanged = false;
    cy.batch(() => {
      cy.elements().forEach((el) => {
        if (!want.has(el.id())) {
          if (el.isNode()) nodesChanged = true;
          el.remove();
        }
      });
      const add = [];
      for (const [id, spec] of want) {
        const el = cy.getElementById(id);
        if (el.nonempty()) {
          if (el.isEdge() && (el.data('source') !== spec.data.source || el.data('target') !== spec.data.target)) {
            el.remove();
            add.push(spec);
            continue;
          }
          el.data(spec.data);
          el.classes(spec.classes);
        } else {
          if (spec.group === 'nodes') nodesChanged = true;
          add.push(spec);
        }
      }
      // nodes before edges
      add.sort((a, b) => (a.group === b.group ? 0 : a.group === 'nodes' ? -1 : 1));
      if (add.length) cy.add(add);
    });
    applyHighlights();
    if (nodesChanged || forceLayout) runLayout();
    stats.lastRenderMs = Math.round(performance.now() - t0);
    updateCounts();
  }

  function graphOrder() {
    // Sessions depth-first: the session tree's children first, then delegation targets, from the
    // sessions nobody points at; a grid laid out in this order keeps subtrees and chains together.
    const next = new Map();
    const pointedAt = new Set();
    const link = (from, to) => {
      if (!next.has(from)) next.set(from, []);
      next.get(from).push(to);
      pointedAt.add(to);
    };
    for (const s of state.sessions.values()) {
      if (s.parent_id && state.sessions.has(s.parent_id)) link(s.parent_id, s.agent_session_id);
    }
    for (const e of state.active.values()) {
      if (state.sessions.has(e.source_session_id) && state.sessions.has(e.target_session_id)) {
        link(e.source_session_id, e.target_session_id);
      }
    }
    const ids = [...state.sessions.keys()].sort();
    const starts = [...ids.filter((id) => !pointedAt.has(id)), ...ids];
    const order = new Map();
    for (const start of starts) {
      const stack = [start];
      while (stack.length) {
        const id = stack.pop();
        if (order.has(id)) continue;
        order.set(id, order.size);
        const kids = next.get(id) || [];
        for (let i = kids.length - 1; i >= 0; i--) if (!order.has(kids[i])) stack.push(kids[i]);
      }
    }
    return order;
  }

  // Labels are drawn only when the nodes are far enough apart on screen to read them.
  const LABEL_SPACING_PX = 70;
  let modelSpacing = Infinity;

  function measureSpacing() {
    const n = cy.nodes().length;
    if (n < 2) { modelSpacing = Infinity; return; }
    const bb = cy.nodes().boundingBox();
    modelSpacing = Math.sqrt(Math.max(bb.w, 1) * Math.max(bb.h, 1) / n);
  }

  function updateLabels() {
    if (!cy) return;
    const on = modelSpacing * cy.zoom() >= LABEL_SPACING_PX && cy.zoom() >= 0.8;
    if (on === stats.labels) return;
    stats.labels = on;
    $('graph').dataset.labels = String(on);
    cy.batch(() => (on ? cy.elements().removeClass('nolabel') : cy.elements().addClass('nolabel')));
  }

  function runLayout() {
    const n = cy.nodes().length;
    if (!n) { stats.layout = 'none'; return; }
    const t0 = performance.now();
    let layout;
    if (n <= GRID_ABOVE) {
      const roots = cy.nodes().filter((node) => node.incomers('edge.tree').empty());
      stats.layout = 'breadthfirst';
      layout = cy.elements('node, edge.tree').layout({
        name: 'breadthfirst', directed: true, roots, spacingFactor: n < 30 ? 1.4 : 1.1, animate: false,
        fit: true, padding: 30, avoidOverlap: true, nodeDimensionsIncludeLabels: true,
      });
    } else {
      const order = graphOrder();
      stats.layout = 'grid';
      cy.elements().removeClass('nolabel'); // cells sized with the labels
      layout = cy.nodes().layout({
        name: 'grid', animate: false, fit: true, padding: 20, avoidOverlap: true, condense: true,
        nodeDimensionsIncludeLabels: true, avoidOverlapPadding: 6,
        sort: (a, b) => (order.get(a.id()) ?? 0) - (order.get(b.id()) ?? 0),
      });
    }
    layout.run();
    measureSpacing();
    stats.labels = null;
    updateLabels();
    stats.layoutMs = Math.round(performance.now() - t0);
    $('graph').dataset.layout = stats.layout;
  }

  function updateCounts() {
    const nodes = cy ? cy.nodes().length : 0;
    const edges = cy ? cy.edges().length : 0;
    const dels = cy ? cy.edges('.delegation').length : 0;
    const activeDels = cy ? cy.edges('.delegation.st-active').length : 0;
    const g = $('graph');
    g.dataset.nodes = String(nodes);
    g.dataset.edges = String(edges);
    g.dataset.delegations = String(dels);
    g.dataset.activeDelegations = String(activeDels);
    g.dataset.renderMs = String(stats.lastRenderMs);
    $('graph-counts').textContent = nodes + ' sessions, ' + (edges - dels) + ' parent edges, ' + dels +
      ' delegations (' + activeDels + ' active)' +
      // the session listing has no at=: sessions started later are left out, colours are today's
      (state.at ? ' as of ' + state.at + ' (session colours: now)' : '');
  }

  function applyHighlights() {
    if (!cy) return;
    cy.batch(() => {
      cy.elements('.hl-matched, .hl-downstream, .hl-terminated').removeClass('hl-matched hl-downstream hl-terminated');
      cy.nodes('.current').removeClass('current');
      cy.edges('.near').removeClass('near');
      const p = state.preview;
      if (p && p.result) {
        for (const id of p.result.downstream_edges || []) cy.getElementById('del:' + id).addClass('hl-downstream');
        for (const id of p.result.matched_edges || []) cy.getElementById('del:' + id).addClass('hl-matched');
        for (const id of p.result.terminated_sessions || []) cy.getElementById(id).addClass('hl-terminated');
      }
      if (state.selected) {
        const node = cy.getElementById(state.selected);
        node.addClass('current');
        node.connectedEdges().addClass('near');
      }
    });
  }

  // ---------------------------------------------------------------------------------------------
  // Loading
  // ---------------------------------------------------------------------------------------------

  async function loadGraph({ forceLayout = false } = {}) {
    const seq = ++state.loadSeq;
    const at = state.at;
    const params = at ? { at } : {};
    let sessions, active;
    try {
      // the session listing has no at=: the sessions as of then are those started by then
      [sessions, active] = await Promise.all([pageAll('agents'), pageAll('delegations/active', params)]);
    } catch (err) {
      if (seq === state.loadSeq) showMessage(err, at ? 'reading the graph as of ' + at : 'reading the graph');
      throw err;
    }
    if (seq !== state.loadSeq) return false; // a newer read started meanwhile
    stats.refreshes += 1;
    const previous = state.active;
    state.sessions = new Map(sessions.filter((s) => !at || !s.started_at || s.started_at <= at)
                                      .map((s) => [s.agent_session_id, s]));
    state.active = new Map(active.map((e) => [e.id, e]));
    if (!at) {
      // edges that left the active listing: ended (revoked or expired); their sources' outbound list says which
      const sources = new Set();
      for (const [id, e] of previous) {
        if (!state.active.has(id)) {
          state.ended.set(id, { ...e, status: state.ended.has(id) ? state.ended.get(id).status : 'ended' });
          sources.add(e.source_session_id);
        }
      }
      for (const id of state.active.keys()) state.ended.delete(id);
      await lookupEnded([...sources].slice(0, ENDED_LOOKUPS));
      if (seq !== state.loadSeq) return false;
    }
    redraw({ forceLayout });
    renderSessionList();
    renderDatalist();
    return true;
  }

  async function lookupEnded(sources) {
    await Promise.all(sources.map(async (sid) => {
      try {
        for (const e of await pageAll('delegations/outbound/' + enc(sid))) rememberEdge(e);
      } catch (err) { /* the session may be gone: keep the edge as "ended" */ }
    }));
  }

  function rememberEdge(e) {
    if (state.at !== null) return;
    if (e.status === 'active' && (!e.expires_at || new Date(e.expires_at) > new Date())) return;
    state.active.delete(e.id);
    state.ended.set(e.id, e);
  }

  // ---------------------------------------------------------------------------------------------
  // Session list (keyboard: one Tab stop, arrows move, Enter opens)
  // ---------------------------------------------------------------------------------------------

  function sessionText(s) {
    return [s.agent_session_id, s.application_id, s.status, ...(s.labels || [])].join(' ').toLowerCase();
  }

  function renderSessionList() {
    const q = $('session-search').value.trim().toLowerCase();
    const all = [...state.sessions.values()].sort((a, b) => (a.agent_session_id < b.agent_session_id ? -1 : 1));
    const matching = q ? all.filter((s) => sessionText(s).includes(q)) : all;
    const shown = matching.slice(0, LIST_SHOWN);
    const list = $('session-list');
    const items = shown.map((s, i) => {
      const li = document.createElement('li');
      li.id = 'opt-' + i;
      li.setAttribute('role', 'option');
      li.dataset.session = s.agent_session_id;
      li.setAttribute('aria-selected', String(s.agent_session_id === state.selected));
      const dot = document.createElement('span');
      dot.className = 'dot st-' + statusClass(s.status);
      dot.setAttribute('aria-hidden', 'true');
      const sid = document.createElement('span');
      sid.className = 'sid';
      sid.textContent = shortId(s.agent_session_id, 14);
      li.title = s.agent_session_id;
      const meta = document.createElement('span');
      meta.textContent = s.application_id + ' · ' + s.status;
      li.append(dot, sid, meta);
      li.addEventListener('click', () => { setListCurrent(i); openSession(s.agent_session_id); });
      return li;
    });
    list.replaceChildren(...items);
    state.listItems = shown.map((s) => s.agent_session_id);
    const keep = state.listItems.indexOf(state.selected);
    setListCurrent(keep >= 0 ? keep : (items.length ? 0 : -1), false);
    $('session-count').textContent = '(' + state.sessions.size + ')';
    const more = $('session-more');
    more.hidden = matching.length <= shown.length;
    more.textContent = (matching.length - shown.length) + ' more: narrow the search';
  }

  function setListCurrent(i, scroll = true) {
    const list = $('session-list');
    const prev = list.querySelector('li.current');
    if (prev) prev.classList.remove('current');
    state.listCurrent = i;
    const li = i >= 0 ? $('opt-' + i) : null;
    if (li) {
      li.classList.add('current');
      list.setAttribute('aria-activedescendant', li.id);
      if (scroll) li.scrollIntoView({ block: 'nearest' });
    } else {
      list.removeAttribute('aria-activedescendant');
    }
  }

  function onListKey(ev) {
    const n = state.listItems.length;
    if (!n) return;
    let i = state.listCurrent;
    switch (ev.key) {
      case 'ArrowDown': i = Math.min(n - 1, i + 1); break;
      case 'ArrowUp': i = Math.max(0, i - 1); break;
      case 'Home': i = 0; break;
      case 'End': i = n - 1; break;
      case 'PageDown': i = Math.min(n - 1, i + 10); break;
      case 'PageUp': i = Math.max(0, i - 10); break;
      case 'Enter': case ' ':
        ev.preventDefault();
        if (i >= 0) openSession(state.listItems[i]);
        return;
      default: return;
    }
    ev.preventDefault();
    setListCurrent(i);
  }

  function renderDatalist() {
    const dl = $('session-ids');
    const opts = [...state.sessions.keys()].slice(0, 2000).map((id) => {
      const o = document.createElement('option');
      o.value = id;
      return o;
    });
    dl.replaceChildren(...opts);
  }

  // ---------------------------------------------------------------------------------------------
  // Details
  // ---------------------------------------------------------------------------------------------

  function field(dl, name, value) {
    const dt = document.createElement('dt');
    dt.textContent = name;
    const dd = document.createElement('dd');
    if (value instanceof Node) dd.append(value); else dd.textContent = value === null || value === undefined ? '—' : typeof value === 'object' ? JSON.stringify(value) : String(value);
    dl.append(dt, dd);
  }

  function badge(status) {
    const b = document.createElement('span');
    b.className = 'badge st-' + statusClass(status);
    b.textContent = status;
    return b;
  }

  function workflowUrl(sessionId) {
    const base = (state.config.temporal_ui_url || '').replace(/\/+$/, '');
    if (!base) return null;
    const wid = 'session/' + state.zone + '/' + sessionId;
    return base + '/namespaces/' + enc(state.config.temporal_namespace || 'default') + '/workflows/' + enc(wid);
  }

  // A JSON value as nested lists, text only.
  function valueNode(v, depth = 0) {
    if (v === null || v === undefined || typeof v !== 'object') {
      const s = document.createElement('span');
      s.className = 'v';
      s.textContent = v === null || v === undefined ? '—' : String(v);
      return s;
    }
    const ul = document.createElement('ul');
    const entries = Array.isArray(v) ? v.map((x, i) => [String(i + 1), x]) : Object.entries(v);
    if (!entries.length) {
      const s = document.createElement('span');
      s.className = 'v';
      s.textContent = Array.isArray(v) ? '(none)' : '{}';
      return s;
    }
    for (const [k, x] of entries) {
      const li = document.createElement('li');
      if (!Array.isArray(v)) {
        const key = document.createElement('span');
        key.className = 'k';
        key.textContent = k + ': ';
        li.append(key);
      }
      li.append(depth > 8 ? document.createTextNode(JSON.stringify(x)) : valueNode(x, depth + 1));
      ul.append(li);
    }
    return ul;
  }

  const AUTHORITY_KEYS = ['effective_scopes', 'effective_resources', 'effective_resource_ids',
                          'effective_resource_constrained', 'effective_max_hops', 'effective_ttl_seconds',
                          'earliest_expires_at', 'inbound_edges'];

  function idSpan(id) {
    const span = document.createElement('span');
    span.className = 'v';
    span.textContent = shortId(id);
    span.title = id;
    return span;
  }

  function chainNode(chain) {
    const frag = document.createDocumentFragment();
    chain.forEach((id, i) => {
      if (i) frag.append(' → ');
      frag.append(idSpan(id));
    });
    return frag;
  }

  // explain=true: what grants each scope and resource (edge chains, root first), and what every
  // inbound edge contributes, or why not.
  function explanationNode(x) {
    const box = document.createElement('div');
    if (x.as_of) {
      const p = document.createElement('p');
      p.className = 'hint';
      p.textContent = 'as of ' + x.as_of;
      box.append(p);
    }
    for (const [key, title] of [['scopes', 'Scope'], ['resources', 'Resource']]) {
      const grants = x[key] || {};
      const names = Object.keys(grants);
      const ul = document.createElement('ul');
      ul.setAttribute('aria-label', title + ' grants');
      if (!names.length) {
        const li = document.createElement('li');
        li.textContent = 'no ' + key;
        ul.append(li);
      }
      for (const name of names) {
        const li = document.createElement('li');
        const k = document.createElement('span');
        k.className = 'k';
        k.textContent = title.toLowerCase() + ' ';
        const v = document.createElement('strong');
        v.textContent = name;
        li.append(k, v, ' granted by ');
        const chains = grants[name] || [];
        if (!chains.length) li.append('(nothing)');
        chains.forEach((chain, i) => {
          if (i) li.append(' and ');
          li.append(chainNode(chain));
        });
        ul.append(li);
      }
      box.append(ul);
    }
    const edges = x.edges || [];
    const t = headedTable(['edge', 'from', 'scopes', 'counts', 'why not / status']);
    t.setAttribute('aria-label', 'Inbound edges and what they contribute');
    const body = t.tBodies[0];
    for (const e of edges) {
      const r = body.insertRow();
      r.dataset.edge = e.edge_id;
      r.dataset.contributes = String(e.contributes);
      r.insertCell().append(chainNode(e.chain && e.chain.length ? e.chain : [e.edge_id]));
      const from = r.insertCell();
      from.append(idSpan(e.source_session_id || ''));
      if (e.source_status) from.append(' (' + e.source_status + ')');
      r.insertCell().textContent = (e.scopes || []).join(', ');
      r.insertCell().textContent = e.contributes ? 'yes' : 'no';
      const why = r.insertCell();
      if (e.reason) {
        const b = document.createElement('strong');
        b.textContent = e.reason;
        why.append(b, ' · ');
      }
      why.append(badge(e.status));
      if (e.status_reason) why.append(' ' + e.status_reason);
    }
    if (edges.length) box.append(t);
    else box.append('no inbound edges');
    const known = new Set(['as_of', 'scopes', 'resources', 'edges']);
    const rest = Object.fromEntries(Object.entries(x).filter(([k]) => !known.has(k)));
    if (Object.keys(rest).length) box.append(valueNode(rest));
    return box;
  }

  function renderAuthority(result) {
    const box = $('authority');
    const explainBox = $('authority-explanation');
    if (result.status === 'rejected') {
      box.replaceChildren(errorNode(result.reason));
      explainBox.replaceChildren();
      return;
    }
    const a = result.value || {};
    const dl = document.createElement('dl');
    dl.className = 'fields';
    for (const k of AUTHORITY_KEYS) {
      if (!(k in a)) continue;
      if (k === 'inbound_edges') {
        const frag = document.createDocumentFragment();
        a[k].forEach((id, i) => { if (i) frag.append(', '); frag.append(idSpan(id)); });
        field(dl, k, a[k].length ? frag : '(none)');
      } else {
        field(dl, k, Array.isArray(a[k]) ? (a[k].join(', ') || '(none)') : a[k]);
      }
    }
    box.replaceChildren(dl);
    const x = a.explanation;
    explainBox.replaceChildren(x && typeof x === 'object' ? explanationNode(x)
                                                          : document.createTextNode('(no explanation in the answer)'));
    explainBox.dataset.loaded = 'true';
  }

  // An edges table with its header row and an empty body.
  function headedTable(headers) {
    const t = document.createElement('table');
    t.className = 'edges-table';
    const head = t.createTHead().insertRow();
    for (const name of headers) {
      const th = document.createElement('th');
      th.textContent = name;
      head.append(th);
    }
    t.createTBody();
    return t;
  }

  function edgesTable(title, edges, other) {
    const wrap = document.createElement('div');
    const h = document.createElement('p');
    h.className = 'hint';
    h.textContent = title + ' (' + edges.length + ')';
    wrap.append(h);
    if (!edges.length) return wrap;
    const t = headedTable([other, 'scopes', 'status', 'created']);
    const body = t.tBodies[0];
    for (const e of edges) {
      const r = body.insertRow();
      const c0 = r.insertCell();
      c0.className = 'mono';
      c0.textContent = shortId(other === 'from' ? e.source_session_id : e.target_session_id);
      c0.title = other === 'from' ? e.source_session_id : e.target_session_id;
      r.insertCell().textContent = (e.scopes || []).join(', ');
      r.insertCell().append(badge(e.status));
      r.insertCell().textContent = (e.created_at || '').replace('T', ' ').replace(/\.\d+Z$/, 'Z');
    }
    wrap.append(t);
    return wrap;
  }

  async function openSession(id) {
    if (!id) return;
    state.selected = id;
    applyHighlights();
    for (const li of $('session-list').querySelectorAll('li')) li.setAttribute('aria-selected', String(li.dataset.session === id));
    $('details-empty').hidden = true;
    $('details-body').hidden = false;
    $('details').dataset.session = id;
    await loadDetails();
  }

  async function loadDetails() {
    const id = state.selected;
    if (!id) return;
    const at = state.at;
    const atParam = at ? { at } : {};
    const sessionP = api(withQuery(zpath('agents/' + enc(id)), atParam));
    const authorityP = api(withQuery(zpath('agents/' + enc(id) + '/effective-authority'), { explain: 'true', ...atParam }));
    const inboundP = pageAll('delegations/inbound/' + enc(id), atParam);
    const outboundP = pageAll('delegations/outbound/' + enc(id), atParam);
    const [session, authority, inbound, outbound] = await Promise.allSettled([sessionP, authorityP, inboundP, outboundP]);
    if (state.selected !== id || state.at !== at) return;

    const dl = $('session-fields');
    dl.replaceChildren();
    if (session.status === 'fulfilled') {
      const s = session.value;
      field(dl, 'session', s.agent_session_id);
      field(dl, 'status', badge(s.status));
      for (const k of ['application_id', 'parent_id', 'subject_authority_record_id', 'lifecycle', 'depth', 'labels',
                       'started_at', 'terminated_at', 'termination_reason', 'ttl_seconds', 'last_heartbeat_at'])
        if (k in s) field(dl, k, Array.isArray(s[k]) ? s[k].join(', ') || '—' : s[k]);
      if (at) field(dl, 'as of', s.as_of || at);
      if (Array.isArray(s.status_history) && s.status_history.length) {
        field(dl, 'status history', valueNode(s.status_history.map((h) => [h.status, h.changed_at || h.at, h.actor, h.reason]
          .filter((x) => x !== undefined && x !== null).join(' · '))));
      }
    } else {
      field(dl, 'session', id);
      field(dl, 'error', errorNode(session.reason));
    }
    const link = $('workflow-link');
    const url = workflowUrl(id);
    link.hidden = !url;
    if (url) link.href = url;
    renderAuthority(authority);

    const box = $('session-edges');
    box.replaceChildren();
    for (const [title, result, other] of [['inbound', inbound, 'from'], ['outbound', outbound, 'to']]) {
      if (result.status === 'fulfilled') {
        box.append(edgesTable(title, result.value, other));
        if (!at) {
          let changed = false;
          for (const e of result.value) if (e.status !== 'active' && !state.ended.has(e.id)) { rememberEdge(e); changed = true; }
          if (changed) redraw();
        }
      } else {
        box.append(errorNode(result.reason));
      }
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Time slider (at=)
  // ---------------------------------------------------------------------------------------------

  async function loadWindow() {
    const slider = $('time-slider');
    try {
      state.window = await api(zpath('history/window'));
      slider.disabled = false;
      slider.title = '';
    } catch (err) {
      state.window = null;
      slider.disabled = true;
      slider.title = 'history unavailable: ' + errorText(err).code;
      $('time-value').textContent = 'live (history: ' + errorText(err).code + ')';
    }
  }

  function sliderInstant(v) {
    const w = state.window;
    const t0 = Date.parse(w.earliest);
    const t1 = Date.parse(w.latest);
    return new Date(t0 + (t1 - t0) * (v / SLIDER_STEPS)).toISOString();
  }

  let sliderTimer = null;
  function onSlider() {
    if (!state.window) return;
    const v = Number($('time-slider').value);
    const iso = sliderInstant(v);
    $('time-value').textContent = iso;
    $('time-slider').setAttribute('aria-valuetext', iso);
    clearTimeout(sliderTimer);
    sliderTimer = setTimeout(() => setAt(iso), 250);
  }

  async function setAt(iso) {
    state.at = iso;
    const live = iso === null;
    $('live').setAttribute('aria-pressed', String(live));
    $('graph').dataset.at = iso || '';
    if (live) {
      $('time-slider').value = String(SLIDER_STEPS);
      $('time-value').textContent = 'live';
      $('time-slider').setAttribute('aria-valuetext', 'live');
      setFeedState(state.feedCtrl ? 'live' : 'off');
    } else {
      setFeedState('paused', 'feed: paused (viewing ' + iso + ')');
    }
    try {
      await loadGraph();
      showMessage(null);
    } catch (err) { /* shown */ }
    await loadDetails();
  }

  // ---------------------------------------------------------------------------------------------
  // Event feed: SSE over fetch (EventSource cannot send a bearer), resumable with ?after=
  // ---------------------------------------------------------------------------------------------

  function setFeedState(s, text) {
    const el = $('feed-state');
    el.dataset.state = s;
    el.textContent = text || 'feed: ' + s;
  }

  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

  async function runFeed(gen) {
    let backoff = 1000;
    while (state.feedGen === gen) {
      const ctrl = new AbortController();
      state.feedCtrl = ctrl;
      try {
        const url = withQuery(zpath('events'), { after: state.cursor, limit: 500 });
        const resp = await fetch(url, { headers: { Authorization: 'Bearer ' + state.token, Accept: 'text/event-stream' },
                                        signal: ctrl.signal, cache: 'no-store' });
        if (!resp.ok) {
          let data = null;
          try { data = await resp.json(); } catch (e) { data = null; }
          const err = new ApiError(resp.status, (data && data.error) || 'http_' + resp.status, data);
          if (resp.status === 401 || resp.status === 403 || resp.status === 404) {
            showMessage(err, 'event feed');
            setFeedState('error', 'feed: ' + err.code);
            return;
          }
          throw err;
        }
        stats.feedConnects += 1;
        if (state.at === null) setFeedState('live');
        backoff = 1000;
        await readStream(resp.body, gen);
      } catch (err) {
        if (state.feedGen !== gen) return;
      }
      if (state.feedGen !== gen) return;
      setFeedState('reconnecting', 'feed: reconnecting');
      await sleep(backoff);
      backoff = Math.min(backoff * 2, 15000);
    }
  }

  async function readStream(body, gen) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = '';
    let ev = { id: null, event: 'message', data: [] };
    for (;;) {
      const { value, done } = await reader.read();
      if (done || state.feedGen !== gen) return;
      buf += value;
      const lines = buf.split(/\r\n|\r|\n/);
      buf = lines.pop();
      for (const line of lines) {
        if (line === '') {
          if (ev.data.length || ev.id !== null) dispatchEvent(ev);
          ev = { id: null, event: 'message', data: [] };
          continue;
        }
        if (line.startsWith(':')) continue; // keepalive comment
        const colon = line.indexOf(':');
        const name = colon < 0 ? line : line.slice(0, colon);
        let val = colon < 0 ? '' : line.slice(colon + 1);
        if (val.startsWith(' ')) val = val.slice(1);
        if (name === 'id') ev.id = val;
        else if (name === 'event') ev.event = val;
        else if (name === 'data') ev.data.push(val);
      }
    }
  }

  function dispatchEvent(ev) {
    if (ev.id) state.cursor = ev.id;
    if (!ev.data.length) return;
    let item = null;
    try { item = JSON.parse(ev.data.join('\n')); } catch (e) { return; }
    stats.feedEvents += 1;
    stats.recent.push({ cursor: Number(ev.id), topic: ev.event, payload: item.payload });
    if (stats.recent.length > 200) stats.recent.shift();
    $('feed-state').dataset.cursor = state.cursor || '';
    scheduleRefresh();
  }

  let refreshTimer = null;
  let lastRefresh = 0;
  let refreshing = false;
  let refreshAgain = false;
  function scheduleRefresh() {
    if (state.at !== null) {
      state.missedEvents = (state.missedEvents || 0) + 1;
      return; // viewing the past: "Live" re-reads
    }
    if (refreshTimer) return;
    const wait = Math.max(REFRESH_DEBOUNCE_MS, lastRefresh + REFRESH_MIN_GAP_MS - Date.now());
    refreshTimer = setTimeout(refreshNow, wait);
  }

  async function refreshNow() {
    refreshTimer = null;
    if (refreshing) { refreshAgain = true; return; }
    refreshing = true;
    lastRefresh = Date.now();
    try {
      await loadGraph();
      if (state.selected) await loadDetails();
    } catch (err) { /* shown */ }
    refreshing = false;
    if (refreshAgain) { refreshAgain = false; scheduleRefresh(); }
  }

  function startFeed() {
    stopFeed();
    const gen = ++state.feedGen;
    runFeed(gen);
  }

  function stopFeed() {
    state.feedGen += 1;
    if (state.feedCtrl) state.feedCtrl.abort();
    state.feedCtrl = null;
    setFeedState('off');
  }

  // ---------------------------------------------------------------------------------------------
  // Bulk revoke
  // ---------------------------------------------------------------------------------------------

  const FILTER_FIELDS = [['f-issuer', 'issuer_application_id'], ['f-receiver', 'receiver_application_id'],
                         ['f-resource', 'resource_id'], ['f-scope', 'scope'], ['f-before', 'created_before', true],
                         ['f-after', 'created_after', true], ['f-subtree', 'source_subtree_of']];

  function readFilter() {
    const filter = {};
    for (const [id, key, isTime] of FILTER_FIELDS) {
      const v = $(id).value.trim();
      if (!v) continue;
      // datetime-local holds no zone: the label says UTC
      filter[key] = isTime ? new Date(v + (v.length === 16 ? ':00' : '') + 'Z').toISOString() : v;
    }
    return filter;
  }

  function uuid() {
    if (window.crypto && typeof crypto.randomUUID === 'function') return crypto.randomUUID();
    const b = crypto.getRandomValues(new Uint8Array(16));
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const h = [...b].map((x) => x.toString(16).padStart(2, '0')).join('');
    return h.slice(0, 8) + '-' + h.slice(8, 12) + '-' + h.slice(12, 16) + '-' + h.slice(16, 20) + '-' + h.slice(20);
  }

  function renderBulk(result, { title, error, offerRepreview } = {}) {
    const box = $('bulk-result');
    box.replaceChildren();
    if (title) {
      const p = document.createElement('p');
      p.textContent = title;
      box.append(p);
    }
    if (error) {
      box.append(errorNode(error));
      box.dataset.error = errorText(error).code;
    } else {
      delete box.dataset.error;
    }
    if (offerRepreview) {
      const b = document.createElement('button');
      b.type = 'button';
      b.textContent = 'Preview again';
      b.id = 'repreview';
      b.addEventListener('click', () => preview());
      box.append(b);
      b.focus();
    }
    if (!result) return;
    const counts = result.counts || {};
    const dl = document.createElement('dl');
    dl.className = 'counts';
    for (const [k, label] of [['matched', 'matched edges'], ['downstream', 'downstream edges'],
                              ['terminated_sessions', 'sessions terminated']]) {
      const dt = document.createElement('dt');
      dt.textContent = label;
      const dd = document.createElement('dd');
      dd.dataset.count = k;
      dd.textContent = String(counts[k] ?? 0);
      dl.append(dt, dd);
    }
    box.append(dl);
    box.dataset.dryRun = String(result.dry_run);
    box.dataset.matched = String(counts.matched ?? 0);
    box.dataset.downstream = String(counts.downstream ?? 0);
    box.dataset.terminated = String(counts.terminated_sessions ?? 0);
    if ('epoch' in result) {
      const p = document.createElement('p');
      p.className = 'hint';
      p.textContent = 'graph epoch ' + result.epoch;
      box.append(p);
    }
    for (const [k, label] of [['matched_edges', 'matched'], ['downstream_edges', 'downstream'],
                              ['terminated_sessions', 'terminated sessions']]) {
      const ids = result[k] || [];
      if (!ids.length) continue;
      const h = document.createElement('p');
      h.className = 'hint';
      h.textContent = label + ':';
      const ul = document.createElement('ul');
      ul.className = 'idlist';
      for (const id of ids) {
        const li = document.createElement('li');
        li.textContent = id;
        ul.append(li);
      }
      box.append(h, ul);
    }
  }

  async function preview() {
    const filter = readFilter();
    $('confirm').disabled = true;
    $('confirm').classList.remove('danger');
    try {
      const result = await api(zpath('delegations/bulk-revoke'), { method: 'POST', body: { filter, dry_run: true } });
      state.preview = { filter, epoch: result.epoch, result };
      renderBulk(result, { title: 'Preview (nothing revoked yet):' });
      $('confirm').disabled = !(result.counts && result.counts.matched > 0);
      if (!$('confirm').disabled) $('confirm').classList.add('danger');
    } catch (err) {
      state.preview = null;
      renderBulk(null, { title: 'Preview failed:', error: err });
    }
    applyHighlights();
  }

  async function confirmRevoke() {
    const p = state.preview;
    if (!p) return;
    $('confirm').disabled = true;
    try {
      const result = await api(zpath('delegations/bulk-revoke'), {
        method: 'POST', headers: { 'Idempotency-Key': uuid() },
        body: { filter: p.filter, dry_run: false, expected_epoch: p.epoch },
      });
      state.preview = null;
      renderBulk(result, { title: 'Revoked (the graph follows from the event feed):' });
    } catch (err) {
      const moved = err instanceof ApiError && err.code === 'delegation_graph_changed';
      renderBulk(null, { title: moved ? 'The delegation graph changed since the preview: nothing was revoked.'
                                      : 'Revoke failed:', error: err, offerRepreview: moved });
      if (!moved) $('confirm').disabled = false;
      else state.preview = null;
    }
    $('confirm').classList.remove('danger');
    applyHighlights();
  }

  function clearPreview() {
    state.preview = null;
    $('confirm').disabled = true;
    $('confirm').classList.remove('danger');
    $('bulk-result').replaceChildren();
    applyHighlights();
  }

  // ---------------------------------------------------------------------------------------------
  // Connecting
  // ---------------------------------------------------------------------------------------------

  async function connect() {
    const token = $('token').value.trim();
    const zone = $('zone').value.trim();
    if (!token || !zone) return;
    state.token = token;
    state.zone = zone;
    sessionStorage.setItem(TOKEN_KEY, token);
    localStorage.setItem(ZONE_KEY, zone);
    stopFeed();
    state.sessions = new Map();
    state.active = new Map();
    state.ended = new Map();
    state.cursor = null;
    state.selected = null;
    state.preview = null;
    state.at = null;
    $('details-empty').hidden = false;
    $('details-body').hidden = true;
    $('bulk-result').replaceChildren();
    $('confirm').disabled = true;
    if (cy) cy.elements().remove();
    showInfo('Reading zone ' + zone + '…');
    const t0 = performance.now();
    try {
      await loadGraph({ forceLayout: true });
    } catch (err) {
      state.connected = false;
      return;
    }
    showMessage(null);
    stats.loadMs = Math.round(performance.now() - t0);
    $('graph').dataset.loadMs = String(stats.loadMs);
    $('graph').dataset.zone = zone;
    state.connected = true;
    document.body.dataset.connected = 'true';
    $('live').setAttribute('aria-pressed', 'true');
    $('time-slider').value = String(SLIDER_STEPS);
    $('time-value').textContent = 'live';
    await loadWindow();
    startFeed();
  }

  async function loadConfig() {
    try {
      const r = await fetch('/ui/config.json', { cache: 'no-store' });
      if (r.ok) state.config = await r.json();
    } catch (e) { /* no Temporal links */ }
  }

  function wire() {
    $('token').value = state.token;
    $('zone').value = state.zone;
    $('connect-form').addEventListener('submit', (ev) => { ev.preventDefault(); connect(); });
    $('forget').addEventListener('click', () => {
      sessionStorage.removeItem(TOKEN_KEY);
      state.token = '';
      $('token').value = '';
      stopFeed();
      $('token').focus();
    });
    $('session-search').addEventListener('input', renderSessionList);
    $('session-search').addEventListener('keydown', (ev) => {
      if (ev.key === 'ArrowDown') { ev.preventDefault(); $('session-list').focus(); setListCurrent(Math.max(0, state.listCurrent)); }
      if (ev.key === 'Enter' && state.listItems.length) { ev.preventDefault(); openSession(state.listItems[Math.max(0, state.listCurrent)]); }
    });
    $('session-list').addEventListener('keydown', onListKey);
    $('show-ended').addEventListener('change', () => redraw());
    $('fit').addEventListener('click', () => cy && cy.fit(undefined, 20));
    $('relayout').addEventListener('click', () => cy && runLayout());
    $('reload').addEventListener('click', () => loadGraph({ forceLayout: true }).catch(() => {}));
    const slider = $('time-slider');
    slider.addEventListener('input', onSlider);
    slider.addEventListener('pointerdown', () => { if (state.at === null) loadWindow(); });
    $('live').addEventListener('click', async () => {
      await loadWindow();
      state.missedEvents = 0;
      await setAt(null);
    });
    $('bulk-form').addEventListener('submit', (ev) => { ev.preventDefault(); preview(); });
    $('bulk-form').addEventListener('input', () => {
      if (state.preview) { state.preview = null; $('confirm').disabled = true; $('confirm').classList.remove('danger'); applyHighlights(); }
    });
    $('confirm').addEventListener('click', confirmRevoke);
    $('clear-preview').addEventListener('click', clearPreview);
    $('use-selected').addEventListener('click', () => {
      if (state.selected) { $('f-subtree').value = state.selected; $('f-subtree').dispatchEvent(new Event('input', { bubbles: true })); }
    });
  }

  window.inspector = { graph: null, state, stats, connect, openSession, setAt, reload: () => loadGraph({ forceLayout: true }) };

  document.addEventListener('DOMContentLoaded', async () => {
    wire();
    initGraph();
    await loadConfig();
    if (state.token && state.zone) connect();
    else (state.token ? $('zone') : $('token')).focus();
  });
})();
