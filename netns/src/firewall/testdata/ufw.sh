for c in ufw-before-logging-forward ufw-before-forward ufw-after-forward ufw-after-logging-forward ufw-reject-forward ufw-track-forward ufw-user-forward ufw-before-input ufw-user-input; do iptables-nft -N $c; done
iptables-nft -P INPUT DROP
iptables-nft -P FORWARD DROP
iptables-nft -A INPUT -j ufw-before-input
iptables-nft -A FORWARD -j ufw-before-logging-forward
iptables-nft -A FORWARD -j ufw-before-forward
iptables-nft -A FORWARD -j ufw-after-forward
iptables-nft -A FORWARD -j ufw-after-logging-forward
iptables-nft -A FORWARD -j ufw-reject-forward
iptables-nft -A FORWARD -j ufw-track-forward
iptables-nft -A ufw-before-forward -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
iptables-nft -A ufw-before-forward -p icmp --icmp-type echo-request -j ACCEPT
iptables-nft -A ufw-before-forward -j ufw-user-forward
iptables-nft -A ufw-before-input -i lo -j ACCEPT
iptables-nft -A ufw-before-input -j ufw-user-input
