(function () {
  var statusFilter = document.getElementById('status-filter');
  var taskFilter = document.getElementById('task-filter');
  var counter = document.getElementById('visible-count');
  function apply() {
    var status = statusFilter.value, task = taskFilter.value, shown = 0, total = 0;
    document.querySelectorAll('section.page').forEach(function (card) {
      var inCard = 0;
      card.querySelectorAll('tr.result').forEach(function (row) {
        var visible = (!status || row.dataset.status === status) && (!task || row.dataset.task === task);
        row.hidden = !visible;
        total += 1;
        if (visible) { inCard += 1; }
      });
      card.hidden = inCard === 0;
      shown += inCard;
    });
    counter.textContent = shown + ' of ' + total + ' rows shown';
  }
  var order = document.getElementById('order');
  var main = document.querySelector('main');
  var cards = Array.from(document.querySelectorAll('section.page'));
  function sort() {
    // Pages without a confidence (errors, routed rows) keep their place after the scored ones.
    var key = function (card) { var v = card.dataset.confidence; return v === '' ? Infinity : Number(v); };
    var sorted = order.value === 'confidence'
      ? cards.slice().sort(function (a, b) { return key(a) - key(b) || cards.indexOf(a) - cards.indexOf(b); })
      : cards;
    sorted.forEach(function (card) { main.appendChild(card); });
  }
  statusFilter.addEventListener('change', apply);
  taskFilter.addEventListener('change', apply);
  order.addEventListener('change', sort);
  apply();
})();
