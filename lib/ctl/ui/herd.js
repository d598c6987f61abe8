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
  var es = new EventSource('/sse/' + live.dataset.page);
  es.onopen = function () { conn.textContent = 'live'; conn.className = 'conn ok'; };
  es.onerror = function () { conn.textContent = 'reconnecting…'; conn.className = 'conn bad'; };
  es.onmessage = function (e) {
    live.innerHTML = e.data;
    applyFilter();
  };
})();
