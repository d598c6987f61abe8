package agent

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/herdhq/herd/agent/hypervisor"
)

type metrics struct {
	domains          *prometheus.GaugeVec
	reconcileErrors  prometheus.Counter
	reconcileSeconds prometheus.Histogram
	leaseLost        prometheus.Counter
	frozen           prometheus.Gauge
	diskFree         *prometheus.GaugeVec
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		domains: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "herd_agent_domains", Help: "Domains herd manages on this node, by state (at the last resync).",
		}, []string{"state"}),
		reconcileErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "herd_agent_reconcile_errors_total", Help: "Reconciles that failed and were retried.",
		}),
		reconcileSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "herd_agent_reconcile_seconds", Help: "Time to reconcile one VM.",
			Buckets: prometheus.ExponentialBuckets(0.001, 4, 9),
		}),
		leaseLost: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "herd_agent_lease_lost_total", Help: "Times the node lease was lost (keepalive failed past the TTL).",
		}),
		frozen: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "herd_agent_frozen", Help: "1 while the agent acts on nothing: etcd went back in time and the leader's restore recovery is not done.",
		}),
	}
	m.diskFree = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "herd_agent_disk_free_bytes", Help: "Free bytes on each filesystem the node needs room on (--disk-path), at the last check.",
	}, []string{"path"})
	reg.MustRegister(m.domains, m.reconcileErrors, m.reconcileSeconds, m.leaseLost, m.frozen, m.diskFree)
	return m
}

func (m *metrics) setDomains(counts map[hypervisor.State]int) {
	for _, s := range []hypervisor.State{hypervisor.Running, hypervisor.Stopped, hypervisor.Paused, hypervisor.Crashed, hypervisor.Other} {
		m.domains.WithLabelValues(string(s)).Set(float64(counts[s]))
	}
}
