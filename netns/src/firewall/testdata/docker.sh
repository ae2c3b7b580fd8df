iptables-nft -N DOCKER; iptables-nft -N DOCKER-USER; iptables-nft -N DOCKER-ISOLATION-STAGE-1; iptables-nft -N DOCKER-ISOLATION-STAGE-2
iptables-nft -P FORWARD DROP
iptables-nft -A FORWARD -j DOCKER-USER
iptables-nft -A FORWARD -j DOCKER-ISOLATION-STAGE-1
iptables-nft -A FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
iptables-nft -A FORWARD -o docker0 -j DOCKER
iptables-nft -A FORWARD -i docker0 ! -o docker0 -j ACCEPT
iptables-nft -A FORWARD -i docker0 -o docker0 -j ACCEPT
iptables-nft -A DOCKER-ISOLATION-STAGE-1 -i docker0 ! -o docker0 -j DOCKER-ISOLATION-STAGE-2
iptables-nft -A DOCKER-ISOLATION-STAGE-1 -j RETURN
iptables-nft -A DOCKER-ISOLATION-STAGE-2 -o docker0 -j DROP
iptables-nft -A DOCKER-ISOLATION-STAGE-2 -j RETURN
iptables-nft -t nat -N DOCKER
iptables-nft -t nat -A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
