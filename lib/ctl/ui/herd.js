// herd UI: the server renders every page; this only swaps in what it pushes (server-sent events),
// follows the filter, and posts the buttons' actions. No polling: the server watches etcd.
(function () {
  var live = document.getElementById('live');
  var conn = document.getElementById('conn');
  var filter = document.getElementById('filter');
  // The filter is the server's (a page shows at most a few hundred rows of a big fleet): typing
  // reopens the stream with the new query, and the address keeps it for a reload or a link.
  var es = null;
  function stream() {
    if (es) es.close();
    var q = filter ? filter.value.trim() : (live.dataset.q || '');
    es = new EventSource('/sse/' + live.dataset.page + (q ? '?q=' + encodeURIComponent(q) : ''));
    es.onopen = function () { conn.textContent = 'live'; conn.className = 'conn ok'; };
    es.onerror = function () { conn.textContent = 'reconnecting…'; conn.className = 'conn bad'; };
    es.onmessage = function (e) { live.innerHTML = e.data; };
    if (filter) history.replaceState(null, '', q ? '?q=' + encodeURIComponent(q) : location.pathname);

  }
  if (filter) {
    var timer = null;
    filter.addEventListener('input', function () {
      clearTimeout(timer);
      timer = setTimeout(stream, 200);
    });
  }
  // Actions: the page's buttons post to /act; the answer (the command's output, or etcd's refusal
  // with herdctl's hint) is shown above the table. The live update shows the effect.
  var result = document.getElementById('result');
  live.addEventListener('click', function (ev) {
    var b = ev.target.closest('button[data-action]');
    if (!b) return;
    if (b.dataset.confirm && !window.confirm(b.dataset.confirm)) return;
    var body = new URLSearchParams({ action: b.dataset.action, target: b.dataset.target || '' });
    b.disabled = true;
    fetch('/act', { method: 'POST', headers: { 'X-Herd-Action': '1' }, body: body })
      .then(function (r) { return r.text().then(function (t) { return { ok: r.ok, text: t }; }); })
      .then(function (r) {
        result.hidden = false;
        result.className = r.ok ? 'ok' : 'refused';
        result.textContent = r.text;
      })
      .catch(function (e) { result.hidden = false; result.className = 'refused'; result.textContent = String(e); })
      .finally(function () { b.disabled = false; });
  });
  // A VM's page: the tail of its serial console, and what the guest prints from now on (the
  // server follows the log at the VM's node). Escape sequences are dropped: the text is shown as
  // text, never interpreted.
  var con = document.getElementById('console');
  var conAbort = null;
  function follow() {
    if (!con) return;
    if (conAbort) conAbort.abort();
    conAbort = new AbortController();
    var dec = new TextDecoder();
    var text = '';
    fetch('/vms/' + encodeURIComponent(con.dataset.vm) + '/console', { signal: conAbort.signal }).then(function (r) {
      var reader = r.body.getReader();
      con.classList.toggle('refused', !r.ok);
      function more() {
        return reader.read().then(function (x) {
          if (x.done) return;
          text += dec.decode(x.value, { stream: true }).replace(/\x1b\[[0-9;?]*[ -\/]*[@-~]/g, '').replace(/\r/g, '');
          if (text.length > 32768) text = text.slice(text.length - 32768);
          var atEnd = con.scrollTop + con.clientHeight >= con.scrollHeight - 4;
          con.textContent = text || '(nothing printed yet)';
          if (atEnd) con.scrollTop = con.scrollHeight;
          return more();
        });
      }
      return more();
    }).catch(function (e) { if (e.name !== 'AbortError') con.textContent += '\n(' + String(e) + ')'; });
  }
  follow();
  stream();
  // A browser allows six connections to one host over HTTP/1.1: a stream left open by a page
  // kept in the back-forward cache would use one up, and with a few pages visited the next
  // request (an action) would wait forever. Close it when leaving; reopen on coming back.
  window.addEventListener('pagehide', function () {
    if (es) { es.close(); es = null; }
    if (conAbort) { conAbort.abort(); conAbort = null; }
  });
  window.addEventListener('pageshow', function (e) { if (e.persisted) { stream(); follow(); } });
})();
