// herd UI: the server renders every page; this only swaps in what it pushes (server-sent events)
// and filters the VM table as one types. No polling: the server watches etcd.
(function () {
  var live = document.getElementById('live');
  var conn = document.getElementById('conn');
  var filter = document.getElementById('filter');
  function applyFilter() {
    if (!filter) return;
    var q = filter.value.trim().toLowerCase();
    var rows = live.querySelectorAll('tbody tr');
    for (var i = 0; i < rows.length; i++) {
      rows[i].hidden = q !== '' && rows[i].textContent.toLowerCase().indexOf(q) < 0;
    }
  }
  if (filter) {
    filter.value = new URLSearchParams(location.search).get('q') || '';
    filter.addEventListener('input', applyFilter);
    applyFilter();
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
  var es = new EventSource('/sse/' + live.dataset.page);
  es.onopen = function () { conn.textContent = 'live'; conn.className = 'conn ok'; };
  es.onerror = function () { conn.textContent = 'reconnecting…'; conn.className = 'conn bad'; };
  es.onmessage = function (e) {
    live.innerHTML = e.data;
    applyFilter();
  };
})();
